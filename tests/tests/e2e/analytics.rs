//! Analytics end to end: simulated agents send two weeks of seasonal, backdated telemetry over
//! real QUIC; an analytics pass (triggered through the CLI) then yields a forecast, costs
//! checked against hand-computed values from the built-in pricing catalog, a plan with
//! savings, and a budget alert that a real HTTP webhook receiver on loopback gets.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use common::framed;
use common::histogram::LogHistogram;
use common::ids::HostId;
use common::proto::{
    Ack, GpuInfo, GpuSample, Hello, HelloReply, HostSample, Inventory, ModelSample, Sample,
    TelemetryBatch, hello_reply,
};
use e2e::{Aggregator, Fleet, WAIT, quic_client};

const HOUR_MS: i64 = 3_600_000;
/// g5.12xlarge and g5.xlarge on-demand in config/pricing.toml.
const RATE_A: f64 = 5.672;
const RATE_B: f64 = 1.006;
/// The hour (back from the current one) in which gpu-b's CPU spikes.
const SPIKE_HOURS_AGO: i64 = 72;

/// resnet's requests/s on gpu-a in the hour starting at `hour_ms`: a daily cycle, lower on
/// weekends.
fn load(hour_ms: i64) -> u64 {
    let h = (hour_ms / HOUR_MS).rem_euclid(24) as f64;
    let weekday = ((hour_ms / HOUR_MS / 24 + 4).rem_euclid(7)) < 5;
    let base = 40.0 + 30.0 * (2.0 * std::f64::consts::PI * h / 24.0).sin();
    (if weekday { base } else { base * 0.5 }).round() as u64
}

/// One sample: gpu-a serves `rps` requests/s of resnet (20 ms of runner time each, so
/// busy_pct = 2 * rps); gpu-b idles.
fn sample(unix_ms: i64, index: u64, busy_host: bool, rps: u64) -> Sample {
    let gpus = if busy_host { 4 } else { 1 };
    let util = if busy_host { (rps / 2).min(100) as u32 } else { 1 };
    let mut models = Vec::new();
    if busy_host {
        let mut latency = LogHistogram::new();
        latency.record_n(30_000, rps.saturating_sub(rps / 10));
        latency.record_n(120_000, rps / 10);
        let mut compute = LogHistogram::new();
        compute.record_n(20_000, rps);
        let mut queue = LogHistogram::new();
        queue.record_n(2_000, rps);
        models.push(ModelSample {
            model: "resnet".into(),
            version: "1".into(),
            interval_ms: 1000,
            requests: rps,
            successes: rps,
            inferences: rps,
            batches: rps,
            batch_slots: 2 * rps,
            latency_us: Some(latency.to_proto()),
            compute_us: Some(compute.to_proto()),
            queue_us: Some(queue.to_proto()),
            ..ModelSample::default()
        });
    }
    Sample {
        unix_ms,
        sample_index: index,
        host: Some(HostSample { cpu_util_pct: 10.0, interval_ms: 1000, ..HostSample::default() }),
        gpus: (0..gpus)
            .map(|i| GpuSample { index: i, util_gpu_pct: Some(util), ..GpuSample::default() })
            .collect(),
        models,
        ..Sample::default()
    }
}

/// Connects as `host` (labels from the pricing catalog), then sends one sample per hour for
/// `days` days back from the current hour plus two recent samples, in batches. On the busy
/// host (`gpu-a`) resnet serves no request in the last `idle_hours` hours and recent samples.
pub(crate) async fn simulate(
    fleet: &Fleet,
    agg: &Aggregator,
    host: &str,
    labels: &[(&str, &str)],
    now_ms: i64,
    days: i64,
    idle_hours: i64,
) {
    let ca = std::fs::read_to_string(fleet.path().join("tls/ca.pem")).unwrap();
    let pair = fleet.ca().issue_host(&HostId::new(host).unwrap(), 1).unwrap();
    let endpoint = quic_client(&ca, &pair.cert_pem, &pair.key_pem);
    let conn = endpoint.connect(agg.quic, "flotilla-aggregator").unwrap().await.unwrap();
    let busy = host == "gpu-a";
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Hello {
        min_version: 1,
        max_version: 1,
        agent_version: "sim".into(),
        spool_epoch: 7,
        inventory: Some(Inventory {
            hostname: host.into(),
            cpu_cores: 48,
            gpus: (0..if busy { 4 } else { 1 })
                .map(|i| GpuInfo { index: i, ..GpuInfo::default() })
                .collect(),
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..Inventory::default()
        }),
        ..Hello::default()
    };
    framed::write(&mut send, &hello).await.unwrap();
    let reply: HelloReply = framed::read(&mut recv, 1 << 20).await.unwrap();
    assert!(matches!(reply.reply, Some(hello_reply::Reply::Welcome(_))), "{reply:?}");

    let current_hour = now_ms.div_euclid(HOUR_MS) * HOUR_MS;
    let mut samples: Vec<Sample> = Vec::new();
    for k in (1..=days * 24).rev() {
        let hour = current_hour - k * HOUR_MS;
        let rps = if k <= idle_hours { 0 } else { load(hour) };
        let mut s = sample(hour + HOUR_MS / 2, samples.len() as u64 + 1, busy, rps);
        if k == SPIKE_HOURS_AGO && !busy {
            // One CPU spike on the idle host, for the anomaly detector to find.
            s.host =
                Some(HostSample { cpu_util_pct: 90.0, interval_ms: 1000, ..HostSample::default() });
        }
        samples.push(s);
    }
    for back in [40_000, 20_000] {
        let rps = if idle_hours > 0 { 0 } else { 50 };
        samples.push(sample(now_ms - back, samples.len() as u64 + 1, busy, rps));
    }
    for (i, chunk) in samples.chunks(48).enumerate() {
        let batch = TelemetryBatch {
            seq: i as u64 + 1,
            samples: chunk.to_vec(),
            ..TelemetryBatch::default()
        };
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        framed::write(&mut send, &batch).await.unwrap();
        send.finish().unwrap();
        let ack: Ack = framed::read(&mut recv, 1024).await.unwrap();
        assert_eq!(ack.seq, batch.seq);
    }
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
}

/// A loopback HTTP server that answers 200 to every request and passes each body on.
fn webhook_receiver() -> (String, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let body = loop {
                let Ok(n) = s.read(&mut chunk) else { break None };
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(
                            String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string(),
                        );
                    }
                }
                if n == 0 {
                    break None;
                }
            };
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if let Some(b) = body {
                let _ = tx.send(b);
            }
        }
    });
    (url, rx)
}

fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

#[test]
fn seasonal_fleet_yields_forecast_costs_plan_and_a_delivered_budget_alert() {
    let fleet = Fleet::new();
    let (webhook, bodies) = webhook_receiver();
    let config = fleet.aggregator_config_with_analytics(
        &format!(
            "webhook_url = \"{webhook}\"\ncost_window_hours = 24\n\
             [plans]\ndeferrable_models = [\"resnet\"]\n\
             [[budgets]]\nname = \"fleet-daily\"\namount = 50.0\nperiod = \"day\"\nscope = \"fleet\"\n\
             thresholds = [{{ pct = 100.0, on = \"forecast\", severity = \"critical\" }}]\n\
             [[alerts]]\nname = \"resnet-p95\"\nmodel = \"resnet\"\np95_latency_ms = 1000.0\n"
        ),
    );
    let agg = Aggregator::start(&config);

    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as i64;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = [("instance_type", "g5.12xlarge"), ("lifecycle", "on-demand")];
        let b = [("instance_type", "g5.xlarge"), ("lifecycle", "on-demand")];
        tokio::time::timeout(WAIT, async {
            tokio::join!(
                simulate(&fleet, &agg, "gpu-a", &a, now_ms, 14, 0),
                simulate(&fleet, &agg, "gpu-b", &b, now_ms, 14, 0)
            );
        })
        .await
        .expect("sending two weeks of telemetry");
    });

    // One pass now; its summary names every forecast target without errors.
    let run = agg.cli_json(&["analytics", "run"]).unwrap();
    assert_eq!(run["hosts"], 2, "{run}");
    let targets: Vec<&str> = run["forecasts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["target"].as_str().unwrap())
        .collect();
    assert!(
        targets.contains(&"model:resnet") && targets.contains(&"host:gpu-a:gpu_util_pct"),
        "{run}"
    );
    for f in run["forecasts"].as_array().unwrap() {
        assert!(f["error"].is_null(), "forecast failed: {f}");
    }

    // The forecast: a week ahead, daily cycle found, a table and an SVG plot.
    let fc = agg.cli_json(&["forecast", "resnet"]).unwrap();
    assert_eq!(fc["forecast"]["point"].as_array().unwrap().len(), 168);
    assert_eq!(fc["forecast"]["seasonality"]["daily"], true, "{}", fc["forecast"]["seasonality"]);
    let first = fc["forecast"]["point"][0].as_f64().unwrap();
    let expected = load(fc["forecast"]["start_ms"].as_i64().unwrap()) as f64;
    assert!((first - expected).abs() < 15.0, "forecast {first} vs the load's {expected}");
    let svg = fleet.path().join("resnet.svg");
    let out = agg.cli(&["forecast", "resnet", "--plot", &svg.display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("Forecast of model:resnet") && table.contains("daily cycle yes"),
        "{table}"
    );
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));

    // Anomalies: gpu-b's CPU spike is the strongest one found in its CPU series.
    let cpu = agg.cli_json(&["forecast", "gpu-b", "--metric", "cpu"]).unwrap();
    let spike = now_ms.div_euclid(HOUR_MS) * HOUR_MS - SPIKE_HOURS_AGO * HOUR_MS;
    let top = cpu["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .max_by(|a, b| a["z"].as_f64().unwrap().abs().total_cmp(&b["z"].as_f64().unwrap().abs()))
        .unwrap_or_else(|| panic!("no anomaly: {cpu}"))
        .clone();
    assert_eq!(
        (top["unix_ms"].as_i64(), top["value"].as_f64()),
        (Some(spike), Some(90.0)),
        "{top}"
    );
    assert!(top["z"].as_f64().unwrap() > 2.0);

    // Costs over the last 24 closed hours, by hand: each host its rate per hour with data (24,
    // or 23 if the clock passed an hour since the data was sent); resnet's share of gpu-a is
    // busy_pct / 100 / 4 GPUs = 2 * rps / 400 each hour.
    let costs = agg.cli_json(&["costs"]).unwrap();
    let host = |h: &str| {
        costs["hosts"].as_array().unwrap().iter().find(|x| x["host"] == h).unwrap().clone()
    };
    let hours = host("gpu-a")["hours"].as_u64().unwrap();
    assert!(hours == 24 || hours == 23, "{costs}");
    assert!(approx(host("gpu-a")["cost"].as_f64().unwrap(), hours as f64 * RATE_A), "{costs}");
    assert!(approx(host("gpu-b")["cost"].as_f64().unwrap(), hours as f64 * RATE_B), "{costs}");
    assert!(approx(costs["total_cost"].as_f64().unwrap(), hours as f64 * (RATE_A + RATE_B)));
    let current_hour = now_ms.div_euclid(HOUR_MS) * HOUR_MS;
    let (mut model_cost, mut inferences) = (0.0, 0.0);
    for k in 1..=24 {
        let hour = current_hour - k * HOUR_MS;
        if hour < costs["window_start_ms"].as_i64().unwrap() {
            continue;
        }
        let rps = load(hour) as f64;
        model_cost += 2.0 * rps / 400.0 * RATE_A;
        inferences += rps * 3600.0;
    }
    let resnet = &costs["models"][0];
    assert_eq!(resnet["model"], "resnet");
    assert!(approx(resnet["cost"].as_f64().unwrap(), model_cost), "{resnet} vs {model_cost}");
    assert!(approx(
        resnet["cost_per_1k_inferences"].as_f64().unwrap(),
        model_cost / inferences * 1000.0
    ));
    let table = String::from_utf8_lossy(&agg.cli(&["costs"]).stdout).to_string();
    assert!(table.contains("COST/1K INFERENCES") && table.contains("gpu-b"), "{table}");

    // Plans: the idle gpu-b (1 % GPU) is scaled in, saving its whole rate each month.
    let plans = agg.cli_json(&["plan"]).unwrap();
    let scale_in = plans
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "scale-in:gpu-b")
        .unwrap_or_else(|| panic!("{plans}"));
    assert!(approx(scale_in["monthly_savings"].as_f64().unwrap(), RATE_B * 730.5), "{scale_in}");
    assert!(
        plans.as_array().unwrap().iter().any(|p| p["id"] == "schedule:model:resnet"),
        "{plans}"
    );
    let table = String::from_utf8_lossy(&agg.cli(&["plan"]).stdout).to_string();
    assert!(table.contains("scale-in") && table.contains("SAVES/MONTH"), "{table}");

    // The budget: 50 a day, while the fleet runs at 6.678/h: the forecast crosses 100 %.
    let budgets = agg.cli_json(&["budgets"]).unwrap();
    assert!(budgets[0]["forecast_pct"].as_f64().unwrap() >= 100.0, "{budgets}");
    let alerts = agg.cli_json(&["alerts"]).unwrap();
    let active: Vec<&str> =
        alerts["active"].as_array().unwrap().iter().map(|a| a["key"].as_str().unwrap()).collect();
    assert_eq!(active, ["budget:fleet-daily:forecast:100"], "{alerts}");
    let table = String::from_utf8_lossy(&agg.cli(&["alerts"]).stdout).to_string();
    assert!(table.contains("budget:fleet-daily") && table.contains("critical"), "{table}");

    // The webhook got it, as JSON.
    let body = bodies.recv_timeout(WAIT).expect("the webhook receiver got no alert");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["alerts"][0]["key"], "budget:fleet-daily:forecast:100", "{v}");
    assert_eq!(v["alerts"][0]["state"], "firing");

    // A second pass: still crossed, no new transition (deduplicated), nothing re-delivered.
    let again = agg.cli_json(&["analytics", "run"]).unwrap();
    assert_eq!(again["alert_transitions"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["active_alerts"], 1);

    // Model metrics from merged histograms over the two recent samples (50 req/s each).
    let models = agg.cli_json(&["models", "--since", "10m"]).unwrap();
    let m = &models[0];
    assert_eq!(
        (m["model"].as_str(), m["requests"].as_u64()),
        (Some("resnet"), Some(100)),
        "{models}"
    );
    assert!((m["latency_p99_ms"].as_f64().unwrap() - 120.0).abs() < 120.0 / 32.0, "{m}");
    assert!((m["latency_p50_ms"].as_f64().unwrap() - 30.0).abs() < 30.0 / 32.0, "{m}");
}
