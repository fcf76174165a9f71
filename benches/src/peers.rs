//! bench-peers: the agent against the Python servers its users compare it with, KServe and
//! MLServer, each wrapping onnxruntime as their users would (`benches/peers/`), on the same
//! ONNX files and inputs, driven by one load generator.
//!
//! For each model, each server in turn (one process at a time, the others stopped), after a
//! warm-up: closed-loop HTTP clients (keep-alive, one request in flight each) at each
//! concurrency, with JSON tensors and, where the server takes them, binary tensors (Triton's
//! binary extension; MLServer refuses it). Each cell prints requests/s, p50 and p99 latency and
//! the server's CPU time per request (its process tree's user + system time over the window,
//! from /proc), and for the agent its ratio to the better peer (requests/s; p99 lower or not).
//!
//! The agent serves each model with `backend = "auto"` (the engine it measured faster at load,
//! printed), one instance, its default batching. Before the servers, each model's raw
//! in-process time per request on tract and on onnxruntime is printed: the physical limit.
//!
//! ```text
//! benches/peers/setup.sh        # .venv-kserve, .venv-mlserver from PyPI
//! ./scripts/test                # or any run that made .venv with onnxruntime
//! cargo run --release -p benches --bin bench-peers -- --seconds 5
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::serving::model_config::ModelConfig;
use agent::serving::onnxruntime::OrtEngine;
use agent::serving::runner::{Engine, Signature, TractEngine};
use agent::serving::tensor::Tensor;
use agent::serving::threads::{OrtThreads, host_cores};
use anyhow::{Context as _, bail};
use benches::inputs::{bench_inputs, binary_request};
use benches::quantile;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "The agent against KServe and MLServer on the same models and load")]
struct Args {
    /// Seconds per cell.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Model files.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "../shared/data/models/ppocr_mobile_v2_cls.onnx,../shared/data/models/silero_vad_op18_ifless.onnx,tests/fixtures/text_cnn.onnx"
    )]
    models: Vec<PathBuf>,
    /// Servers: agent, kserve, mlserver.
    #[arg(long, value_delimiter = ',', default_value = "agent,kserve,mlserver")]
    servers: Vec<String>,
    /// Cores kept for the load generator (the last ones this process may use); every server
    /// process and the raw runs get the rest. 0 (the default) runs everything on every core:
    /// onnxruntime inside the Python servers pins its own pool threads to every core, out of
    /// the set they inherit, so a split would confine the agent and not its peers.
    #[arg(long, default_value_t = 0)]
    client_cores: usize,
}

/// The cores given to the load generator, if they are split off.
static CORE_SPLIT: std::sync::OnceLock<Option<benches::cores::CoreSplit>> =
    std::sync::OnceLock::new();

/// A running server process.
struct Server {
    name: &'static str,
    child: Option<Child>,
    /// The agent runs under the e2e harness, which owns its process.
    agent: Option<(e2e::Proc, e2e::Fleet)>,
    addr: String,
    binary: bool,
}

impl Server {
    fn pid(&self) -> u32 {
        match (&self.child, &self.agent) {
            (Some(c), _) => c.id(),
            (None, Some((p, _))) => p.pid(),
            _ => 0,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // SIGTERM first, so uvicorn's worker processes go with their parent.
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn repo_root() -> PathBuf {
    std::env::current_dir().unwrap_or_default()
}

fn start(kind: &str, name: &str, file: &Path, scratch: &Path) -> anyhow::Result<Server> {
    let file = std::fs::canonicalize(file).with_context(|| format!("{}", file.display()))?;
    match kind {
        "agent" => {
            let fleet = e2e::Fleet::new();
            let repo = fleet.path().join("models");
            std::fs::create_dir_all(repo.join(name).join("1"))?;
            std::fs::copy(&file, repo.join(name).join("1/model.onnx"))?;
            std::fs::write(repo.join(name).join("config.toml"), "backend = \"auto\"\n")?;
            let library = agent::serving::ort_library::runtime(None)
                .map_err(|e| anyhow::anyhow!(e))?
                .library
                .display()
                .to_string();
            let (proc, addr) = e2e::serving_agent_env(
                &fleet,
                "peers",
                "127.0.0.1:9".parse()?,
                &repo,
                1000,
                &[("ORT_DYLIB_PATH", Some(&library))],
            );
            Ok(Server {
                name: "agent",
                child: None,
                agent: Some((proc, fleet)),
                addr,
                binary: true,
            })
        }
        "kserve" => {
            let port = free_port()?;
            let grpc = free_port()?;
            let python = repo_root().join(".venv-kserve/bin/python");
            if !python.exists() {
                bail!("{} is missing: run benches/peers/setup.sh", python.display());
            }
            let child = Command::new(python)
                .arg(repo_root().join("benches/peers/kserve_server.py"))
                .args(["--model_name", name, "--model_path"])
                .arg(&file)
                .args(["--http_port", &port.to_string(), "--grpc_port", &grpc.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let addr = format!("127.0.0.1:{port}");
            Ok(Server { name: "kserve", child: Some(child), agent: None, addr, binary: true })
        }
        "mlserver" => {
            let dir = scratch.join(format!("mlserver-{name}"));
            std::fs::create_dir_all(&dir)?;
            std::fs::copy(
                repo_root().join("benches/peers/mlserver_runtime/onnx_runtime.py"),
                dir.join("onnx_runtime.py"),
            )?;
            let (port, grpc, metrics) = (free_port()?, free_port()?, free_port()?);
            // parallel_workers = 0: inference in the server process. MLServer 1.7's default
            // worker pool dies at start on this machine ("There is no current event loop").
            std::fs::write(
                dir.join("settings.json"),
                serde_json::json!({
                    "http_port": port, "grpc_port": grpc, "metrics_port": metrics,
                    "parallel_workers": 0,
                })
                .to_string(),
            )?;
            std::fs::write(
                dir.join("model-settings.json"),
                serde_json::json!({
                    "name": name,
                    "implementation": "onnx_runtime.OnnxRuntimeModel",
                    "parameters": {"uri": file},
                })
                .to_string(),
            )?;
            let mlserver = repo_root().join(".venv-mlserver/bin/mlserver");
            if !mlserver.exists() {
                bail!("{} is missing: run benches/peers/setup.sh", mlserver.display());
            }
            let child = Command::new(repo_root().join(".venv-mlserver/bin/python"))
                .arg(mlserver)
                .args(["start", "."])
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let addr = format!("127.0.0.1:{port}");
            Ok(Server { name: "mlserver", child: Some(child), agent: None, addr, binary: false })
        }
        other => bail!("--servers: must be agent, kserve or mlserver, got {other:?}"),
    }
}

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn wait_ready(server: &Server, model: &str) -> anyhow::Result<()> {
    let agent = http_agent();
    let url = format!("http://{}/v2/models/{model}/ready", server.addr);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if agent.get(&url).call().is_ok_and(|r| r.status() == 200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{} did not get {model} ready in 120 s", server.name)
}

/// A request body: JSON tensors, or the binary extension (with its header length).
#[derive(Clone)]
struct Body {
    bytes: Vec<u8>,
    header_len: Option<usize>,
}

fn json_body(signature: &Signature, inputs: &[Tensor]) -> Body {
    let tensors: Vec<_> = signature
        .inputs
        .iter()
        .zip(inputs)
        .map(|(io, t)| {
            serde_json::json!({
                "name": io.name, "shape": t.shape(), "datatype": t.dtype().name(), "data": t.to_json(),
            })
        })
        .collect();
    Body {
        bytes: serde_json::json!({"inputs": tensors}).to_string().into_bytes(),
        header_len: None,
    }
}

fn send(agent: &ureq::Agent, url: &str, body: &Body) -> anyhow::Result<()> {
    let mut request = agent.post(url);
    request = match body.header_len {
        Some(n) => request
            .header("Inference-Header-Content-Length", n.to_string())
            .header("Content-Type", "application/octet-stream"),
        None => request.header("Content-Type", "application/json"),
    };
    let mut response = request.send(&body.bytes[..])?;
    let status = response.status();
    let reply = response.body_mut().with_config().limit(1 << 30).read_to_vec()?;
    if status != 200 {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&reply[..reply.len().min(300)]));
    }
    Ok(())
}

/// User + system CPU seconds of `pid` and every descendant, from /proc.
fn tree_cpu_seconds(pid: u32) -> f64 {
    let mut stats: Vec<(u32, u32, u64)> = Vec::new(); // (pid, ppid, ticks)
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // The command name is in parentheses and may hold spaces: fields start after ')'.
            let Some((_, rest)) = text.rsplit_once(')') else { continue };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            // rest[0] is the state (field 3); ppid is field 4, utime 14, stime 15.
            let ppid = u32::try_from(field(1)).unwrap_or(0);
            stats.push((p, ppid, field(11) + field(12)));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(stats.iter().filter(|(_, pp, _)| *pp == parent).map(|(p, _, _)| *p));
        i += 1;
    }
    let ticks: u64 = stats.iter().filter(|(p, _, _)| tree.contains(p)).map(|(_, _, t)| t).sum();
    ticks as f64 / 100.0 // USER_HZ is 100 on Linux
}

/// A table cell's place: tensor encoding and concurrency.
type CellKey = (&'static str, usize);

struct Cell {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_ms: f64,
    errors: usize,
}

fn measure(server: &Server, url: &str, body: &Body, clients: usize, seconds: f64) -> Cell {
    let body = Arc::new(body.clone());
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let cpu_before = tree_cpu_seconds(server.pid());
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (url, body) = (url.to_owned(), body.clone());
            std::thread::spawn(move || {
                benches::cores::pin_client(CORE_SPLIT.get().and_then(Option::as_ref));
                let agent = http_agent();
                let (mut lat, mut errors) = (Vec::new(), 0usize);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match send(&agent, &url, &body) {
                        Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for h in handles {
        if let Ok((l, e)) = h.join() {
            lat.extend(l);
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = tree_cpu_seconds(server.pid()) - cpu_before;
    lat.sort_by(f64::total_cmp);
    Cell {
        rps: lat.len() as f64 / elapsed,
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        cpu_ms: cpu * 1000.0 / lat.len().max(1) as f64,
        errors,
    }
}

/// The engine the agent's `auto` chose for `model`, and why.
fn print_choice(server: &Server, model: &str) {
    let config = ureq::get(&format!("http://{}/v2/models/{model}/config", server.addr))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_json::<serde_json::Value>().ok());
    if let Some(choice) = config.as_ref().map(|c| &c["engine"]["choice"]) {
        println!("agent chose {}: {}", choice["chosen"], choice["reason"]);
    }
}

/// Median milliseconds of one single-row request on an engine in-process.
fn raw_ms(engine: &dyn Engine, inputs: &[Tensor]) -> f64 {
    for _ in 0..5 {
        let _ = engine.run(inputs.to_vec());
    }
    let mut times: Vec<f64> = (0..50)
        .map(|_| {
            let t = Instant::now();
            let _ = engine.run(inputs.to_vec());
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    quantile(&times, 0.5)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Before any server starts, so each server process inherits the server's cores.
    let split = benches::cores::CoreSplit::apply(args.client_cores)?;
    let _ = CORE_SPLIT.set(split.clone());
    let scratch = tempfile::tempdir()?;
    println!(
        "bench-peers: {} s per cell, {} CPU cores for the server and the raw runs ({}), one server at a time",
        args.seconds,
        host_cores(),
        split.as_ref().map_or_else(
            || "the load generator shares them".to_owned(),
            benches::cores::CoreSplit::describe
        )
    );
    for file in &args.models {
        let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("model").replace('.', "_");
        let config = ModelConfig::default();
        let (tract, signature) = TractEngine::load(file, &config)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let one_row = bench_inputs(&signature, 1)?;
        let tract_ms = raw_ms(&tract, &one_row);
        // The agent's default: the host's shared onnxruntime pool of `cores` threads.
        let threads = host_cores();
        let ort_ms = OrtEngine::load(file, &config, &config.onnxruntime, OrtThreads::HostPool)
            .map(|(e, _)| raw_ms(&e, &one_row))
            .unwrap_or(f64::NAN);
        println!(
            "\n{name}: raw in-process per request: tract {tract_ms:.3} ms (1 thread), onnxruntime {ort_ms:.3} ms ({threads} threads)"
        );
        let (header_len, binary) = binary_request(&signature, &one_row);
        let bodies = [
            ("json", json_body(&signature, &one_row)),
            ("binary", Body { bytes: binary, header_len: Some(header_len) }),
        ];
        println!(
            "{:<9} {:<7} {:>4} | {:>9} {:>8} {:>8} {:>10} | {:>8} {:>9}",
            "server",
            "tensors",
            "conc",
            "req/s",
            "p50 ms",
            "p99 ms",
            "cpu ms/req",
            "x best",
            "p99 lower"
        );
        let mut results: Vec<(CellKey, Vec<(&'static str, Cell)>)> = Vec::new();
        for kind in &args.servers {
            let server = match start(kind, &name, file, scratch.path()) {
                Ok(s) => s,
                Err(e) => {
                    println!("{kind:<9} not measured: {e:#}");
                    continue;
                }
            };
            if let Err(e) = wait_ready(&server, &name) {
                println!("{kind:<9} not measured: {e:#}");
                continue;
            }
            let url = format!("http://{}/v2/models/{name}/infer", server.addr);
            for (encoding, body) in &bodies {
                if *encoding == "binary" && !server.binary {
                    continue;
                }
                let warm = http_agent();
                if let Err(e) = (0..30).try_for_each(|_| send(&warm, &url, body)) {
                    println!("{:<9} {encoding:<7} refused the request: {e:#}", server.name);
                    continue;
                }
                if server.name == "agent" && *encoding == "json" {
                    // After the warm-up: `auto` may decide on the first real request.
                    std::thread::sleep(Duration::from_secs(3));
                    print_choice(&server, &name);
                }
                for &clients in &args.concurrency {
                    let cell = measure(&server, &url, body, clients, args.seconds);
                    if cell.errors > 0 {
                        println!(
                            "{:<9} {encoding:<7} {clients:>4} | {} errors",
                            server.name, cell.errors
                        );
                    }
                    match results.iter_mut().find(|(k, _)| *k == (*encoding, clients)) {
                        Some((_, list)) => list.push((server.name, cell)),
                        None => results.push(((*encoding, clients), vec![(server.name, cell)])),
                    }
                }
            }
        }
        for ((encoding, clients), cells) in &results {
            let best_peer = cells
                .iter()
                .filter(|(s, _)| *s != "agent")
                .max_by(|a, b| a.1.rps.total_cmp(&b.1.rps));
            for (server, cell) in cells {
                let (ratio, lower) = match (server, best_peer) {
                    (&"agent", Some((_, peer))) => (
                        format!("{:.2}", cell.rps / peer.rps),
                        if cell.p99_ms < peer.p99_ms { "yes" } else { "no" }.to_owned(),
                    ),
                    _ => (String::new(), String::new()),
                };
                println!(
                    "{:<9} {:<7} {:>4} | {:>9.1} {:>8.2} {:>8.2} {:>10.2} | {:>8} {:>9}",
                    server,
                    encoding,
                    clients,
                    cell.rps,
                    cell.p50_ms,
                    cell.p99_ms,
                    cell.cpu_ms,
                    ratio,
                    lower
                );
            }
        }
    }
    Ok(())
}
