//! In-process engines as clients see them: models on onnxruntime and on `auto` served through
//! Triton's own Python client with tract's outputs; a missing onnxruntime library taking down
//! only the models that need it; and Triton's perf_analyzer, unmodified, over several
//! concurrency levels.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agent::serving::tensor::{DataType, Tensor};
use e2e::cases::{f32_tensor, tract_case, values};
use e2e::{Fleet, http_get, install, onnxruntime_library, serving_agent_env, shared_model};
use serde_json::{Value, json};

/// The text classifier fixture: an INT32 input, one-hot, convolutions and dense layers.
fn text_cnn() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/text_cnn.onnx")
}

/// Token ids in [0, 64), the classifier's vocabulary.
fn tokens(rows: usize, seed: u64) -> Tensor {
    let ids: Vec<u8> = values(rows * 512, seed)
        .into_iter()
        .flat_map(|v| (((v + 1.0) * 32.0) as i32).clamp(0, 63).to_le_bytes())
        .collect();
    Tensor::from_bytes(DataType::I32, vec![rows, 512], ids).unwrap()
}

/// An agent serving `repo` with `env` (no aggregator: it spools its telemetry and serves).
fn agent_with(
    fleet: &Fleet,
    host: &str,
    repo: &Path,
    env: &[(&str, Option<&str>)],
) -> (e2e::Proc, String) {
    serving_agent_env(fleet, host, "127.0.0.1:9".parse().unwrap(), repo, 500, env)
}

#[test]
fn onnxruntime_serves_through_tritonclient_like_tract() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    let ocr = shared_model("ppocr_mobile_v2_cls.onnx");
    install(&repo, "text", &text_cnn(), "backend = \"onnxruntime\"\nmax_batch_size = 8\n");
    install(&repo, "ocr", &ocr, "backend = \"onnxruntime\"\nmax_batch_size = 8\n");
    install(&repo, "auto", &text_cnn(), "backend = \"auto\"\n");
    let own = "backend = \"onnxruntime\"\n[onnxruntime]\nintra_op_threads = 1\n";
    install(&repo, "own", &text_cnn(), own);
    let row = 3 * 48 * 192;
    let cases = json!([
        tract_case("text", &text_cnn(), vec![("tokens", tokens(1, 1))]),
        tract_case("text", &text_cnn(), vec![("tokens", tokens(3, 2))]),
        tract_case("auto", &text_cnn(), vec![("tokens", tokens(2, 3))]),
        tract_case("ocr", &ocr, vec![("x", f32_tensor(vec![2, 3, 48, 192], &values(2 * row, 4)))]),
    ]);
    let cases_file = fleet.path().join("cases.json");
    std::fs::write(&cases_file, cases.to_string()).unwrap();
    let library = onnxruntime_library().display().to_string();
    let (agent, addr) =
        agent_with(&fleet, "engines-1", &repo, &[("ORT_DYLIB_PATH", Some(&library))]);
    agent.wait_for_log(&["chose an engine."]);
    e2e::python_check("engines_check.py", &addr, &repo, &cases_file, &agent);
}

#[test]
fn a_missing_onnxruntime_library_makes_only_its_models_unavailable() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    install(&repo, "ocr", &shared_model("ppocr_mobile_v2_cls.onnx"), "");
    install(&repo, "text", &text_cnn(), "backend = \"onnxruntime\"\n");
    install(&repo, "auto", &text_cnn(), "backend = \"auto\"\n");
    let missing = fleet.path().join("nowhere/libonnxruntime.so.1.32.0").display().to_string();
    let home = fleet.path().display().to_string();
    // Nothing to find: a library path that does not exist, no virtualenv, a HOME without one,
    // and a working directory (the test's) without .venv.
    let (agent, addr) = agent_with(
        &fleet,
        "engines-2",
        &repo,
        &[("ORT_DYLIB_PATH", Some(&missing)), ("VIRTUAL_ENV", None), ("HOME", Some(&home))],
    );
    agent.wait_for_log(&["Model failed to load", "text"]);
    let index: Value = e2e::http_post_json(&addr, "/v2/repository/index", "{}");
    let state = |name: &str| -> Value {
        index.as_array().unwrap().iter().find(|m| m["name"] == name).cloned().unwrap_or_default()
    };
    let text = state("text");
    assert_eq!(text["state"], "UNAVAILABLE", "{index}");
    let reason = text["reason"].as_str().unwrap();
    for needle in ["ORT_DYLIB_PATH", &missing, "pip install onnxruntime", "onnxruntime.library"] {
        assert!(reason.contains(needle), "{needle:?} missing from the reason: {reason}");
    }
    assert_eq!(state("ocr")["state"], "READY", "tract models keep serving: {index}");
    // `auto` falls back to tract and says why.
    assert_eq!(state("auto")["state"], "READY", "{index}");
    let config: Value = serde_json::from_str(&http_get(&addr, "/v2/models/auto/config")).unwrap();
    assert_eq!(config["engine"]["engine"], "tract", "{config}");
    let why = config["engine"]["choice"]["reason"].as_str().unwrap();
    assert!(why.contains("onnxruntime is not available"), "{why}");
}

/// perf_analyzer 2.41.1 from the `tritonclient` wheel, set up by `scripts/test`.
fn perf_analyzer() -> PathBuf {
    let tool = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.tools/perf_analyzer-2.41.1/perf_analyzer");
    assert!(
        tool.exists(),
        "{} is missing: run ./scripts/test, which unpacks it from the tritonclient==2.41.1 wheel",
        tool.display()
    );
    tool
}

#[test]
fn perf_analyzer_runs_unmodified_over_several_concurrency_levels() {
    let tool = perf_analyzer();
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    install(&repo, "text", &text_cnn(), "backend = \"onnxruntime\"\nmax_batch_size = 8\n");
    install(&repo, "ocr", &shared_model("ppocr_mobile_v2_cls.onnx"), "max_batch_size = 8\n");
    let library = onnxruntime_library().display().to_string();
    let (agent, addr) =
        agent_with(&fleet, "engines-3", &repo, &[("ORT_DYLIB_PATH", Some(&library))]);
    for (model, extra) in
        [("text", vec!["--input-data", "zero"]), ("ocr", vec!["--shape", "x:3,48,192"])]
    {
        let out = Command::new(&tool)
            .env("LD_LIBRARY_PATH", tool.parent().unwrap())
            .args(["-m", model, "-u", &addr, "-i", "http", "--concurrency-range", "1:4:1"])
            .args(["--measurement-mode", "count_windows", "--measurement-request-count", "40"])
            .args(["--stability-percentage", "50", "--max-trials", "10"])
            .args(&extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{stdout}");
        if !out.status.success() {
            agent.dump();
            panic!(
                "perf_analyzer on {model} failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for level in 1..=4 {
            assert!(
                stdout.contains(&format!("Concurrency: {level}, throughput:")),
                "{model}: no result at concurrency {level}:\n{stdout}"
            );
        }
        // It read the server's side of each level from the statistics endpoint.
        assert!(stdout.contains("Server:"), "{stdout}");
    }
}

/// Clients that speak HTTP/2 (cleartext, prior knowledge, as gRPC-style clients and `curl
/// --http2-prior-knowledge` do) get HTTP/2 on the same port; HTTP/1.1 clients are unchanged.
#[test]
fn http2_clients_are_served_on_the_same_port() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    install(&repo, "text", &text_cnn(), "");
    let (_agent, addr) = agent_with(&fleet, "engines-4", &repo, &[]);
    let body = json!({"inputs": [{
        "name": "tokens", "shape": [1, 512], "datatype": "INT32", "data": vec![3; 512],
    }]})
    .to_string();
    let curl = |version: &str| {
        let out = Command::new("curl")
            .args(["-s", "-S", version, "-w", "\n%{http_version} %{http_code}", "-d", &body])
            .arg(format!("http://{addr}/v2/models/text/infer"))
            .output()
            .expect("curl is missing: scripts/test installs it (Debian's curl)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (flag, version) in [("--http2-prior-knowledge", "2 200"), ("--http1.1", "1.1 200")] {
        let reply = curl(flag);
        assert!(reply.ends_with(version), "{flag}: {reply}");
        assert!(reply.contains("\"probabilities\""), "{flag}: {reply}");
    }
}

#[test]
fn an_optimizer_search_on_a_real_agent_measures_every_candidate_including_its_memory() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    install(&repo, "text", &text_cnn(), "backend = \"onnxruntime\"\nmax_batch_size = 4\n");
    let library = onnxruntime_library().display().to_string();
    let (agent, addr) =
        agent_with(&fleet, "optimize-1", &repo, &[("ORT_DYLIB_PATH", Some(&library))]);
    let started = e2e::http_post_json(
        &addr,
        "/v2/models/text/optimize",
        r#"{"strategy":"memory","rounds":3,"max_batch":2,"cpu_share":1.0}"#,
    );
    assert_eq!(started["state"], "running", "{started}");
    let report = e2e::eventually("the search's report", Duration::from_secs(180), || {
        let state: serde_json::Value =
            serde_json::from_str(&http_get(&addr, "/v2/models/text/optimize")).ok()?;
        match state["state"].as_str() {
            Some("done") => Some(state["report"].clone()),
            Some("failed") => panic!("the search failed: {state}\n{}", agent.logs().join("\n")),
            _ => None,
        }
    });
    let steps = report["steps"].as_array().expect("steps");
    let names: Vec<&str> = steps.iter().filter_map(|s| s["candidate"].as_str()).collect();
    assert_eq!(
        names,
        [
            "tract",
            "onnxruntime host pool",
            "onnxruntime 1 thread",
            "onnxruntime host pool, extended graph optimizations",
            "onnxruntime host pool, basic graph optimizations",
            "tract f16",
            "tract, one plan for every batch size"
        ],
        "{report}"
    );
    for step in steps {
        assert_eq!(step["outcome"], "timed", "{step}");
        // Each candidate's memory was measured alone by `flotilla-agent footprint`.
        assert!(step["memory_bytes"].as_u64().is_some_and(|b| b > 0), "{step}");
        assert!(step["agreement"]["max_abs_error"].as_f64().is_some_and(|e| e < 1e-3), "{step}");
    }
    assert!(report["winner"].is_string(), "{report}");
    assert!(report["why"].as_str().is_some_and(|w| w.contains("smallest peak memory")), "{report}");
    // The model served on through the search.
    let metadata = http_get(&addr, "/v2/models/text/ready");
    assert!(metadata.contains("true"), "{metadata}");
}

/// Four real-shaped silero requests: 512 samples of a tone at 16 kHz and a zero state (the
/// synthesized inputs would not run: silero's frames must be 512 samples).
fn silero_calibration() -> String {
    let requests: Vec<Value> = (0..4)
        .map(|r| {
            let samples: Vec<f32> =
                (0..512).map(|i| (((i + r * 512) as f32) * 0.05).sin() * 0.3).collect();
            json!({"inputs": [
                {"name": "input", "shape": [1, 512], "datatype": "FP32", "data": samples},
                {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": vec![0.0f32; 256]},
                {"name": "sr", "shape": [], "datatype": "INT64", "data": [16000]},
            ]})
        })
        .collect();
    Value::Array(requests).to_string()
}

#[test]
fn an_optimizer_search_of_the_shared_silero_model_reads_its_calibration_file() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    install(&repo, "vad", &shared_model("silero_vad_op18_ifless.onnx"), "");
    std::fs::write(repo.join("vad/calibration.json"), silero_calibration()).unwrap();
    let library = onnxruntime_library().display().to_string();
    let (agent, addr) =
        agent_with(&fleet, "optimize-2", &repo, &[("ORT_DYLIB_PATH", Some(&library))]);
    let started = e2e::http_post_json(
        &addr,
        "/v2/models/vad/optimize",
        r#"{"strategy":"throughput","rounds":3,"cpu_share":1.0}"#,
    );
    assert_eq!(started["state"], "running", "{started}");
    let report = e2e::eventually("the search's report", Duration::from_secs(180), || {
        let state: Value =
            serde_json::from_str(&http_get(&addr, "/v2/models/vad/optimize")).ok()?;
        match state["state"].as_str() {
            Some("done") => Some(state["report"].clone()),
            Some("failed") => panic!("the search failed: {state}\n{}", agent.logs().join("\n")),
            _ => None,
        }
    });
    let inputs = report["inputs"].as_str().unwrap();
    assert!(inputs.contains("calibration.json") && inputs.contains("4 requests"), "{report}");
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps[0]["candidate"], "tract", "{report}");
    for step in steps {
        // tract's f16 transform leaves silero's `If` branches in f32 (tract 0.23.9), so that
        // candidate fails with tract's reason; it is reported, not assumed.
        if step["candidate"] == "tract f16" && step["outcome"] != "timed" {
            assert!(!step["why"].as_str().unwrap().is_empty(), "{step}");
            continue;
        }
        // Every other candidate agreed with tract on the real-shaped frames and was timed:
        // silero cannot batch, so one size, three runs, each figure measured.
        assert_eq!(step["outcome"], "timed", "{step}");
        assert!(step["agreement"]["max_abs_error"].as_f64().is_some_and(|e| e < 1e-3), "{step}");
        let timings = step["timings"].as_array().unwrap();
        assert_eq!(timings.len(), 1, "{step}");
        assert_eq!((timings[0]["batch"].as_u64(), timings[0]["runs"].as_u64()), (Some(1), Some(3)));
        assert!(timings[0]["p50_ms"].as_f64().is_some_and(|p| p > 0.0), "{step}");
        assert!(step["why"].as_str().unwrap().contains("cannot batch"), "{step}");
    }
    assert!(steps.len() >= 5, "tract and four onnxruntime candidates: {report}");
    assert!(report["why"].as_str().is_some_and(|w| w.contains("most rows/s")), "{report}");
    assert!(http_get(&addr, "/v2/models/vad/ready").contains("true"));
}
