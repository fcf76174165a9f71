//! Serving lifecycle under load: a real `flotilla-agent` serving a deliberately slow model
//! (made at test start with the venv's `onnx`), with requests in flight when the model is
//! unloaded or the agent is stopped. Every request gets an answer, the stop is bounded, and the
//! last telemetry is sealed.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{Aggregator, Fleet, Proc, samples_produced};

/// Concurrent requests in each test.
const CLIENTS: usize = 16;

fn venv_python() -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/test (it makes the venv)",
        python.display()
    );
    python
}

/// Writes the slow model (`tests/python/make_fixtures.py --slow`) as `repo/slow/1/model.onnx`,
/// unbatched with one instance so requests queue behind each other.
fn install_slow_model(repo: &Path) {
    let dir = repo.join("slow/1");
    std::fs::create_dir_all(&dir).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/make_fixtures.py");
    let out = Command::new(venv_python())
        .arg(script)
        .arg("--slow")
        .arg(dir.join("model.onnx"))
        .arg("1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "making the slow model: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(repo.join("slow/config.toml"), "max_batch_size = 0\ninstances = 1\n").unwrap();
}

/// Starts an agent serving `repo` on port 0 (uplinking to `agg`); returns it and its API address.
fn serving_agent(fleet: &Fleet, host: &str, agg: &Aggregator, repo: &Path) -> (Proc, String) {
    e2e::serving_agent(fleet, host, agg.quic, repo, 200)
}

/// POSTs `body` and returns the status and body; a reply slower than `limit` fails the test
/// (that is the hang this module is about).
fn post(addr: &str, path: &str, body: &str, limit: Duration) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(limit)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("no complete answer within {limit:?}: {e}"))?;
    let (head, reply) = out.split_once("\r\n\r\n").ok_or_else(|| format!("not HTTP: {out:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, reply.to_owned()))
}

fn infer_body(seed: usize) -> String {
    let data: Vec<f32> = (0..64).map(|i| ((i + seed) % 7) as f32 / 7.0).collect();
    serde_json::json!({
        "inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": data}]
    })
    .to_string()
}

/// Starts `CLIENTS` requests on their own threads; each returns its answer or why it had none.
fn start_requests(addr: &str) -> Vec<std::thread::JoinHandle<Result<(u16, String), String>>> {
    (0..CLIENTS)
        .map(|i| {
            let addr = addr.to_owned();
            std::thread::spawn(move || {
                post(&addr, "/v2/models/slow/infer", &infer_body(i), Duration::from_secs(20))
            })
        })
        .collect()
}

/// Waits until the agent has queued requests for the slow model (its metrics say so).
fn wait_until_busy(addr: &str) {
    // Requests reach the queue within a few ms; the model then takes tens of ms each.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        let Ok(mut s) = TcpStream::connect(addr) else { continue };
        let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        if text.lines().any(|l| {
            l.starts_with("flotilla_model_requests_total{model=\"slow\"") && !l.ends_with(" 0")
        }) {
            return;
        }
    }
}

/// Sends `signal` to the process.
fn signal(proc: &Proc, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(proc.pid()).unwrap());
    nix::sys::signal::kill(pid, signal).unwrap();
}

/// Every request was answered, 200 or 503 naming `reason`; returns how many were 503.
fn check_answers(
    calls: Vec<std::thread::JoinHandle<Result<(u16, String), String>>>,
    reason: &str,
) -> usize {
    let mut refused = 0;
    for (i, call) in calls.into_iter().enumerate() {
        let (status, body) = call.join().unwrap().unwrap_or_else(|e| panic!("request {i}: {e}"));
        match status {
            200 => {}
            503 => {
                assert!(body.contains(reason), "request {i}: 503 without {reason:?}: {body}");
                refused += 1;
            }
            other => panic!("request {i}: status {other}: {body}"),
        }
    }
    refused
}

#[test]
fn unload_answers_every_request_in_flight() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    install_slow_model(&repo);
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let (agent_proc, addr) = serving_agent(&fleet, "life-unload", &agg, &repo);
    agent_proc.wait_for_log(&["Model ready.", "slow"]);

    let calls = start_requests(&addr);
    wait_until_busy(&addr);
    let (status, body) =
        post(&addr, "/v2/repository/models/slow/unload", "{}", Duration::from_secs(10)).unwrap();
    assert_eq!(status, 200, "{body}");
    let refused = check_answers(calls, "was unloaded");
    assert!(refused > 0, "the unload came after every request finished; the test proves nothing");
    agent_proc.wait_for_log(&["Model unloaded.", "slow"]);
}

#[test]
fn sigterm_with_requests_in_flight_stops_in_bounded_time_and_seals_the_spool() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    install_slow_model(&repo);
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let (mut agent_proc, addr) = serving_agent(&fleet, "life-stop", &agg, &repo);
    agent_proc.wait_for_log(&["Model ready.", "slow"]);

    let calls = start_requests(&addr);
    // A client that sends half a request and then nothing: the HTTP drain cannot finish it.
    let mut stuck = TcpStream::connect(&addr).unwrap();
    write!(
        stuck,
        "POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{\"inputs\""
    )
    .unwrap();
    wait_until_busy(&addr);
    let stopped_at = Instant::now();
    signal(&agent_proc, nix::sys::signal::Signal::SIGTERM);
    // The seal does not wait behind the HTTP clients.
    agent_proc.wait_for_log(&["Stopping: sealing the last samples."]);
    assert!(
        stopped_at.elapsed() < Duration::from_secs(3),
        "seal started {:?} after SIGTERM",
        stopped_at.elapsed()
    );
    let status = agent_proc.wait();
    let took = stopped_at.elapsed();
    assert!(status.success(), "{status:?}");
    // Grace for HTTP (10 s) runs beside the uplink drain (5 s); allow for a slow machine.
    assert!(took < Duration::from_secs(16), "stop took {took:?}");
    assert!(samples_produced(&agent_proc) > 0);
    agent_proc.wait_for_log(&["did not drain within its grace period"]);
    let refused = check_answers(calls, "shutting down");
    eprintln!("stop took {took:?}; {refused} of {CLIENTS} requests answered 503");
    drop(stuck);
}

#[test]
fn a_second_signal_during_a_stuck_drain_exits_at_once() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    install_slow_model(&repo);
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let (mut agent_proc, addr) = serving_agent(&fleet, "life-twice", &agg, &repo);
    agent_proc.wait_for_log(&["Model ready.", "slow"]);
    let mut stuck = TcpStream::connect(&addr).unwrap();
    write!(
        stuck,
        "POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{\"inputs\""
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    signal(&agent_proc, nix::sys::signal::Signal::SIGTERM);
    agent_proc.wait_for_log(&["Signal received; stopping"]);
    std::thread::sleep(Duration::from_millis(300));
    let second = Instant::now();
    signal(&agent_proc, nix::sys::signal::Signal::SIGINT);
    let status = agent_proc.wait();
    assert!(second.elapsed() < Duration::from_secs(3), "took {:?}", second.elapsed());
    assert_eq!(status.code(), Some(130), "{status:?}");
    agent_proc.wait_for_log(&["Second signal received"]);
    drop(stuck);
}
