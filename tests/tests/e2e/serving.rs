//! Inference serving as clients see it: a real `flotilla-agent` serving the shared ONNX models,
//! driven by Triton's own Python client, with its statistics reaching the aggregator; and an
//! overload at many times capacity.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agent::serving::tensor::{DataType, Tensor};
use e2e::cases::{f32_tensor, tract_case as case, values};
use e2e::{Aggregator, Fleet, Proc, WAIT, agent, eventually, install};
use serde_json::{Value, json};

/// The shared development models, beside the checkout.
fn shared_model(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/models").join(file)
}

fn serving_agent(fleet: &Fleet, host: &str, agg: &Aggregator, repo: &Path) -> (Proc, String) {
    fleet.issue(host);
    let config = fleet.agent_config(host, agg.quic, 500);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[serving]\nlisten = \"127.0.0.1:0\"\nmodel_repository = \"{}\"\nmax_request_bytes = 16777216\n",
        repo.display()
    ));
    std::fs::write(&config, text).unwrap();
    let proc = agent(host, &config);
    let line = proc.wait_for_log(&["Inference API listening."]);
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr in {line:?}"))
        .to_owned();
    (proc, addr)
}

#[test]
fn tritonclient_works_unmodified_and_stats_reach_the_aggregator() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    let ocr = shared_model("ppocr_mobile_v2_cls.onnx");
    let vad = shared_model("silero_vad_op18_ifless.onnx");
    install(&repo, "ocr", &ocr, "max_batch_size = 8\nmax_queue_delay_us = 2000\n");
    install(&repo, "vad", &vad, "");
    std::fs::create_dir_all(repo.join("broken/1")).unwrap();
    std::fs::write(repo.join("broken/1/model.onnx"), b"this is not an ONNX file").unwrap();

    let row = 3 * 48 * 192;
    let cases = json!([
        case("ocr", &ocr, vec![("x", f32_tensor(vec![1, 3, 48, 192], &values(row, 1)))]),
        case("ocr", &ocr, vec![("x", f32_tensor(vec![2, 3, 48, 192], &values(2 * row, 2)))]),
        case(
            "vad",
            &vad,
            vec![
                ("input", f32_tensor(vec![1, 512], &values(512, 3))),
                ("state", f32_tensor(vec![2, 1, 128], &vec![0.0; 256])),
                (
                    "sr",
                    Tensor::from_bytes(DataType::I64, vec![], 16_000i64.to_le_bytes().to_vec())
                        .unwrap()
                ),
            ]
        ),
    ]);
    let cases_file = fleet.path().join("cases.json");
    std::fs::write(&cases_file, cases.to_string()).unwrap();

    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let (agent_proc, addr) = serving_agent(&fleet, "infer-1", &agg, &repo);
    agent_proc.wait_for_log(&["Model failed to load", "broken"]);

    e2e::python_check("serving_check.py", &addr, &repo, &cases_file, &agent_proc);

    // /metrics is Prometheus text with the per-model families.
    let metrics = e2e::http_get(&addr, "/metrics");
    for family in [
        "flotilla_model_requests_total{model=\"ocr\",version=\"1\"}",
        "flotilla_model_latency_seconds_bucket{model=\"ocr\",version=\"1\",le=\"+Inf\"}",
        "flotilla_model_batch_size_bucket{model=\"vad\",version=\"1\",le=\"1\"}",
        "flotilla_model_dispatches_total{model=\"vad\",version=\"1\",reason=\"unbatched\"} ",
    ] {
        assert!(metrics.contains(family), "{family} missing from /metrics:\n{metrics}");
    }
    // promtool is part of the test's set-up (scripts/test installs it): its absence fails the
    // test rather than skipping the check.
    let promtool = which("promtool")
        .expect("promtool is missing: install Debian's `prometheus` package (scripts/test does)");
    {
        let mut check = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        check.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
        let result = check.wait_with_output().unwrap();
        assert!(
            result.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }

    // The model statistics travel with the telemetry and land in the aggregator's store.
    eventually("ocr request rate stored by the aggregator", WAIT, || {
        let series = agg
            .cli_json(&["metrics", "infer-1", "model.ocr.requests_per_s", "--since", "10m"])
            .ok()?;
        let total: f64 =
            series["points"].as_array()?.iter().filter_map(|p| p["value"].as_f64()).sum();
        (total > 0.0).then_some(())
    });
    // `flotilla models` shows them fleet-wide, percentiles from merged histograms.
    let models = eventually("ocr in flotilla models", WAIT, || {
        let rows = agg.cli_json(&["models", "--since", "10m"]).ok()?;
        let rows = rows.as_array()?.clone();
        let ocr = rows.into_iter().find(|r| r["model"] == "ocr")?;
        (ocr["successes"].as_u64() >= Some(2)).then_some(ocr)
    });
    assert_eq!(models["hosts"], json!(["infer-1"]), "{models}");
    assert!(models["latency_p99_ms"].as_f64().unwrap() > 0.0, "{models}");
    assert!(models["latency_p50_ms"].as_f64() <= models["latency_p99_ms"].as_f64(), "{models}");
    let table = agg.cli(&["models"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("ocr"));
}

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths).map(|p| p.join(program)).find(|p| p.is_file())
        })
        .ok_or(())
}

/// One raw KServe JSON inference; returns the status code and when it came back.
fn http_infer(addr: &str, model: &str, body: &str) -> (u16, Instant) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, Instant::now())
}

#[test]
fn overload_refuses_the_excess_fast_and_serves_the_admitted() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    // One instance, batches of up to 4, at most 8 waiting: capacity is small on purpose.
    install(
        &repo,
        "ocr",
        &shared_model("ppocr_mobile_v2_cls.onnx"),
        "max_batch_size = 4\nmax_queue_delay_us = 500\nmax_queue_size = 8\ninstances = 1\n",
    );
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let (_agent, addr) = serving_agent(&fleet, "overload-1", &agg, &repo);
    let x: Vec<f32> = values(3 * 48 * 192, 9);
    let body =
        json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192], "data": x}]})
            .to_string();
    // Warm the plan for one row so the burst measures serving, not plan building.
    assert_eq!(http_infer(&addr, "ocr", &body).0, 200);

    let clients = 96;
    let start = Instant::now();
    let results: Vec<(u16, Instant)> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            (0..clients).map(|_| scope.spawn(|| http_infer(&addr, "ocr", &body))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<Instant> = results.iter().filter(|(s, _)| *s == 200).map(|(_, t)| *t).collect();
    let refused: Vec<Instant> =
        results.iter().filter(|(s, _)| *s == 503).map(|(_, t)| *t).collect();
    assert_eq!(ok.len() + refused.len(), clients, "only successes and 503s: {results:?}");
    assert!(!refused.is_empty(), "a burst of {clients} against 8 queue slots refuses some");
    assert!(ok.len() >= 8, "the admitted are served: {} ok", ok.len());
    // The excess is refused at once: the median refusal comes back before the median success.
    let median = |v: &[Instant]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2] - start
    };
    assert!(median(&refused) < median(&ok), "refusals are not faster than service");

    // The server counted the same story, and nobody expired or failed.
    let stats: Value = serde_json::from_str(&e2e::http_get(&addr, "/v2/models/ocr/stats")).unwrap();
    let f = &stats["model_stats"][0]["flotilla"];
    assert_eq!(f["rejected"].as_u64().unwrap() as usize, refused.len(), "{stats}");
    assert_eq!(f["expired"], 0, "{stats}");
    assert_eq!(
        stats["model_stats"][0]["inference_stats"]["success"]["count"].as_u64().unwrap() as usize,
        ok.len() + 1,
        "{stats}"
    );
}

#[test]
fn kserve_backend_forwards_batches_to_another_server() {
    let fleet = Fleet::new();
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    // The "accelerator": a second agent process serving the demo model with tract.
    let accel_repo = fleet.path().join("accel-models");
    agent::serving::demo::install_demo(&accel_repo).unwrap();
    let (_accel, accel_addr) = serving_agent(&fleet, "accel-1", &agg, &accel_repo);
    // The front agent forwards its "classifier" batches to it.
    let repo = fleet.path().join("front-models");
    std::fs::create_dir_all(repo.join("classifier/1")).unwrap();
    std::fs::write(
        repo.join("classifier/config.toml"),
        format!(
            "backend = \"kserve\"\nmax_batch_size = 4\n[kserve]\nurl = \"http://{accel_addr}\"\nmodel = \"demo\"\n"
        ),
    )
    .unwrap();
    let (_front, front_addr) = serving_agent(&fleet, "front-1", &agg, &repo);

    let body = json!({"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32",
        "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]}]})
    .to_string();
    let direct = e2e::http_post_json(&accel_addr, "/v2/models/demo/infer", &body);
    let forwarded = e2e::http_post_json(&front_addr, "/v2/models/classifier/infer", &body);
    assert_eq!(forwarded["model_name"], "classifier");
    assert_eq!(forwarded["outputs"][0]["shape"], json!([2, 3]), "{forwarded}");
    assert_eq!(forwarded["outputs"][0]["data"], direct["outputs"][0]["data"]);
    let meta: Value =
        serde_json::from_str(&e2e::http_get(&front_addr, "/v2/models/classifier")).unwrap();
    assert_eq!(meta["platform"], "kserve");
    assert_eq!(meta["inputs"][0]["name"], "features");
}
