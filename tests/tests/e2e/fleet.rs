//! Many hosts reporting to one aggregator, observed the way an operator would: the CLI.

use e2e::{Aggregator, Fleet, WAIT, agent, eventually};

#[test]
fn three_agents_report_and_the_cli_shows_fresh_metrics() {
    let fleet = Fleet::new();
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let hosts = ["gpu-a", "gpu-b", "cpu-c"];
    let _agents: Vec<_> = hosts
        .iter()
        .map(|h| {
            fleet.issue(h);
            agent(h, &fleet.agent_config(h, agg.quic, 200))
        })
        .collect();

    let rows = eventually("three online hosts with samples", WAIT, || {
        let rows = agg.cli_json(&["hosts"]).ok()?;
        let rows = rows.as_array()?.clone();
        let fresh = rows.iter().filter(|r| {
            r["state"] == "online"
                && r["samples_total"].as_u64() >= Some(3)
                && r["cpu_util_pct"].is_number()
        });
        (fresh.count() == 3).then_some(rows)
    });
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as i64;
    for row in &rows {
        let last_seen = row["last_seen_unix_ms"].as_i64().unwrap();
        assert!(now_ms - last_seen < 30_000, "stale host {row}");
        assert_eq!(row["gpu_count"], 0, "CI has no GPU");
    }

    // The human table names every host.
    let table = agg.cli(&["hosts"]);
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    for h in hosts {
        assert!(table.contains(h), "{h} missing from:\n{table}");
    }

    // One host in detail: inventory and a latest sample with host readings.
    let detail = agg.cli_json(&["host", "gpu-b"]).unwrap();
    assert!(detail["inventory"]["cpu_cores"].as_u64().unwrap() >= 1);
    assert!(detail["inventory"]["memory_total_bytes"].as_u64().unwrap() > 0);
    assert!(detail["latest"]["host"]["memory_total_bytes"].as_u64().unwrap() > 0);

    // A metric series over the last minutes, as JSON and as a sparkline.
    let series = agg.cli_json(&["metrics", "cpu-c", "memory_used_bytes", "--since", "5m"]).unwrap();
    let points = series["points"].as_array().unwrap();
    assert!(points.len() >= 3, "{series}");
    assert!(points.iter().all(|p| p["value"].as_f64().unwrap() > 0.0));
    let plot = agg.cli(&["metrics", "cpu-c", "memory_used_bytes", "--since", "5m", "--plot"]);
    assert!(plot.status.success(), "{}", String::from_utf8_lossy(&plot.stderr));

    // An unknown host is a clear error, not a crash.
    let unknown = agg.cli(&["host", "nobody"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown host nobody"));
}
