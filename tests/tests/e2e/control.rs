//! Directives end to end: a real aggregator and a real agent serving a real ONNX model, driven
//! through the `flotilla` CLI; and a hand-driven aggregator (real QUIC, the fleet's own
//! certificates) that sends one directive id to an agent before and after the agent restarts.

use std::path::Path;
use std::time::Duration;

use common::framed;
use common::proto::{
    Directive, DirectiveResult, DirectiveStatus, HelloReply, Welcome, hello_reply,
};
use e2e::{Aggregator, Fleet, WAIT, agent, eventually, http_get, serving_agent, shared_model};
use serde_json::Value;

fn install_ocr(repo: &Path) {
    let dir = repo.join("ocr/1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(shared_model("ppocr_mobile_v2_cls.onnx"), dir.join("model.onnx")).unwrap();
    std::fs::write(repo.join("ocr/config.toml"), "max_batch_size = 1\ninstances = 1\n").unwrap();
}

/// `flotilla directive send HOST KIND FIELDS... --json`, parsed.
fn send(agg: &Aggregator, host: &str, kind: &str, fields: &[&str], wait_secs: u64) -> Value {
    let wait = wait_secs.to_string();
    let mut args = vec!["directive", "send", host, kind];
    args.extend_from_slice(fields);
    args.extend_from_slice(&["--wait-secs", &wait]);
    agg.cli_json(&args).unwrap()
}

fn instances_gauge(addr: &str) -> Option<u64> {
    http_get(addr, "/metrics")
        .lines()
        .find(|l| l.starts_with("flotilla_model_instances{model=\"ocr\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn online(agg: &Aggregator, host: &str) {
    eventually(&format!("{host} online"), WAIT, || {
        let hosts = agg.cli_json(&["hosts"]).ok()?;
        hosts.as_array()?.iter().find(|h| h["host"] == host && h["state"] == "online").cloned()
    });
}

#[test]
fn directives_apply_once_reject_by_name_and_wait_out_a_disconnect() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    install_ocr(&repo);
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let (mut node, addr) = serving_agent(&fleet, "node-1", agg.quic, &repo, 500);
    online(&agg, "node-1");
    assert_eq!(instances_gauge(&addr), Some(1));

    // Applied, with what changed; the agent serves with 3 instances.
    let d = send(&agg, "node-1", "set_instances", &["model=ocr", "instances=3"], 30);
    assert_eq!(d["state"], "applied", "{d}");
    assert!(d["message"].as_str().unwrap().contains("instances 1 -> 3"), "{d}");
    assert_eq!(d["attempts"], 1);
    assert_eq!(instances_gauge(&addr), Some(3));
    // The model's config shows the count in force, as Triton's does.
    let config: Value = serde_json::from_str(&http_get(&addr, "/v2/models/ocr/config")).unwrap();
    assert_eq!(config["instance_group"][0]["count"], 3, "{config}");

    // Refused with the reason, and nothing changes.
    let d = send(&agg, "node-1", "set_instances", &["model=nosuch", "instances=2"], 30);
    assert_eq!(d["state"], "rejected", "{d}");
    assert!(d["message"].as_str().unwrap().contains("unknown model \"nosuch\""), "{d}");
    let d = send(&agg, "node-1", "set_instances", &["model=ocr", "instances=0"], 30);
    assert_eq!(d["state"], "rejected", "{d}");
    assert!(d["message"].as_str().unwrap().contains('0'), "{d}");
    assert_eq!(instances_gauge(&addr), Some(3));
    // A bad request never reaches an agent: the API names the field.
    let out = agg.cli(&["directive", "send", "node-1", "set_instances", "model=ocr"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing field `instances`"));

    // Sent while the agent is down: pending, then applied once after it reconnects.
    node.kill();
    eventually("node-1 offline", WAIT, || {
        let hosts = agg.cli_json(&["hosts"]).ok()?;
        hosts.as_array()?.iter().find(|h| h["host"] == "node-1" && h["state"] != "online").cloned()
    });
    let d = send(&agg, "node-1", "set_instances", &["model=ocr", "instances=2"], 0);
    assert_eq!(d["state"], "pending", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let pending = agg.cli_json(&["directives", "--state", "pending"]).unwrap();
    assert_eq!(pending.as_array().unwrap().len(), 1, "{pending}");
    let config = fleet.path().join("agent-node-1.toml");
    let node = agent("node-1", &config);
    let addr = e2e::inference_addr(&node);
    let done = eventually("the pending directive applied", WAIT, || {
        let d = agg.cli_json(&["directive", "show", &id]).ok()?;
        (d["state"] == "applied").then_some(d)
    });
    assert_eq!(done["attempts"], 1, "{done}");
    // The restarted agent came up with its config's 1 instance; the directive made it 2.
    assert!(done["message"].as_str().unwrap().contains("instances 1 -> 2"), "{done}");
    assert_eq!(instances_gauge(&addr), Some(2));
    let handled =
        node.logs().iter().filter(|l| l.contains(&id) && l.contains("Directive handled.")).count();
    assert_eq!(handled, 1);

    // Every directive has a decision, and the operator's decisions are listed by model (the
    // one about "nosuch" is not about ocr).
    let decisions = agg.cli_json(&["decisions", "--model", "ocr"]).unwrap();
    let decisions = decisions.as_array().unwrap();
    assert_eq!(decisions.len(), 3, "{decisions:?}");
    assert!(
        decisions
            .iter()
            .all(|d| d["source"] == "operator" && d["directives"].as_array().unwrap().len() == 1)
    );
    let desired = http_get(agg.api.trim_start_matches("http://"), "/api/v1/hosts/node-1/desired");
    let desired: Value = serde_json::from_str(&desired).unwrap();
    assert_eq!(desired["models"]["ocr"]["instances"], 2, "{desired}");
    let metrics = http_get(agg.api.trim_start_matches("http://"), "/metrics");
    // The restart was noticed (a new run id): the desired state was sent again after the
    // pending directive, and changed nothing more.
    let resync = agg.cli_json(&["decisions"]).unwrap();
    let resync: Vec<&Value> =
        resync.as_array().unwrap().iter().filter(|d| d["rule"] == "desired.resync").collect();
    assert_eq!(resync.len(), 1, "{resync:?}");
    assert!(
        metrics.contains("flotilla_directives_answered_total{state=\"applied\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flotilla_directives_answered_total{state=\"rejected\"} 2"),
        "{metrics}"
    );

    // Restarted again with nothing pending: it comes back with its config's 1 instance, and
    // the aggregator sends its desired state (2) again.
    drop(node);
    let node = agent("node-1", &config);
    let addr = e2e::inference_addr(&node);
    eventually("the desired 2 instances again", WAIT, || {
        instances_gauge(&addr).filter(|n| *n == 2)
    });
    let list = agg.cli_json(&["decisions"]).unwrap();
    let resyncs = list.as_array().unwrap().iter().filter(|d| d["rule"] == "desired.resync").count();
    assert_eq!(resyncs, 2);
}

/// Accepts the next agent connection that completes its handshake and says Hello (attempts
/// queued by an agent process that has since stopped are skipped).
async fn next_agent(endpoint: &quinn::Endpoint) -> (quinn::Connection, quinn::SendStream) {
    loop {
        let incoming = endpoint.accept().await.unwrap();
        let hello = async {
            let conn = incoming.await.ok()?;
            let (send, mut recv) = conn.accept_bi().await.ok()?;
            let _: common::proto::Hello = framed::read(&mut recv, 1 << 20).await.ok()?;
            Some((conn, send))
        };
        if let Ok(Some(found)) = tokio::time::timeout(Duration::from_secs(5), hello).await {
            return found;
        }
    }
}

/// A hand-driven aggregator: accepts one agent connection, answers its Hello, sends
/// `directive`, and returns the agent's result.
async fn exchange(endpoint: &quinn::Endpoint, directive: &Directive) -> DirectiveResult {
    let (conn, mut send) = tokio::time::timeout(WAIT, next_agent(endpoint)).await.unwrap();
    let welcome = HelloReply {
        reply: Some(hello_reply::Reply::Welcome(Welcome {
            version: common::proto::MAX_VERSION,
            host_id: "node-2".into(),
            max_frame_bytes: 4 << 20,
            ..Welcome::default()
        })),
    };
    framed::write(&mut send, &welcome).await.unwrap();
    let _ = send.finish();
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    framed::write(&mut tx, directive).await.unwrap();
    let _ = tx.finish();
    let result = tokio::time::timeout(WAIT, framed::read(&mut rx, 1 << 20)).await.unwrap().unwrap();
    conn.close(0u32.into(), b"done");
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directive_resent_after_an_agent_restart_is_answered_not_applied_again() {
    let fleet = Fleet::new();
    let tls = fleet.path().join("tls");
    let server = common::tls::server_config(
        &tls.join("ca.pem"),
        &tls.join("server.pem"),
        &tls.join("server.key"),
        common::tls::Revocations::default(),
    )
    .unwrap();
    let endpoint = common::quic::server_endpoint("127.0.0.1:0".parse().unwrap(), server).unwrap();
    let quic = endpoint.local_addr().unwrap();
    let repo = fleet.path().join("models");
    install_ocr(&repo);
    let directive = Directive {
        id: "fixed-id-1".into(),
        kind: "set_instances".into(),
        payload: br#"{"model":"ocr","instances":4}"#.to_vec(),
        not_after_unix_ms: 0,
    };

    let (mut node, addr) = serving_agent(&fleet, "node-2", quic, &repo, 500);
    let first = exchange(&endpoint, &directive).await;
    assert_eq!(first.status(), DirectiveStatus::Applied, "{first:?}");
    assert!(first.message.contains("instances 1 -> 4"), "{first:?}");
    assert_eq!(instances_gauge(&addr), Some(4));
    node.terminate();

    // The restarted agent serves its config's 1 instance; the same id must not change that.
    let node = agent("node-2", &fleet.path().join("agent-node-2.toml"));
    let addr = e2e::inference_addr(&node);
    assert_eq!(instances_gauge(&addr), Some(1));
    let again = exchange(&endpoint, &directive).await;
    assert_eq!(again, first, "a repeat gets the first result");
    assert_eq!(instances_gauge(&addr), Some(1), "the repeat was applied again");
    assert!(
        node.logs()
            .iter()
            .any(|l| l.contains("Directive repeated; answered with its first result."))
    );
}

/// One OCR request body (`x`: `[1, 3, 48, 192]`).
fn ocr_request() -> String {
    let data: Vec<f32> = (0..3 * 48 * 192).map(|i| (i % 17) as f32 / 17.0).collect();
    serde_json::json!({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32", "data": data}]})
        .to_string()
}

fn applied_set_instances(agg: &Aggregator) -> Vec<Value> {
    let list = agg.cli_json(&["directives", "--host", "node-3", "--state", "applied"]).unwrap();
    list.as_array().unwrap().iter().filter(|d| d["kind"] == "set_instances").cloned().collect()
}

#[test]
fn load_scales_a_model_up_at_once_and_down_only_after_the_stabilization_window() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    install_ocr(&repo);
    let agg = aggregator_with_policies(
        &fleet,
        "[[policy]]\nname = \"ocr-load\"\nmodel = \"ocr\"\nmode = \"reactive\"\n\
         min_instances = 1\nmax_instances = 4\nstabilization_window_secs = 8\n\
         cooldown_down_secs = 0\nscale_down_limit = { instances = 4, per_secs = 1 }\n\
         [policy.targets]\nrequests_per_instance = 5.0\n",
    );
    let (_node, addr) = serving_agent(&fleet, "node-3", agg.quic, &repo, 500);
    online(&agg, "node-3");

    // Load: 4 clients, each a request every ~50 ms (tens of requests/s against a target of 5
    // per instance).
    let load = Load::start(&addr, 4);
    let up = eventually("a scale-up applied", WAIT, || {
        applied_set_instances(&agg)
            .into_iter()
            .find(|d| d["payload"]["instances"].as_u64() > Some(1))
    });
    assert!(up["message"].as_str().unwrap().contains("instances 1 -> "), "{up}");
    let decision = &agg
        .cli_json(&["decisions", "--model", "ocr"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == up["decision"])
        .cloned()
        .unwrap();
    assert_eq!(decision["source"], "policy:ocr-load", "{decision}");
    let rule = decision["rule"].as_str().unwrap();
    assert!(
        ["reactive.scale_up", "bounds.max", "rate_limit.up", "burst.bypass"].contains(&rule),
        "{decision}"
    );
    assert!(decision["inputs"]["desired"].as_u64() > decision["inputs"]["current"].as_u64());
    assert!(decision["inputs"]["engine"]["observation"]["demand_rps"].as_f64().unwrap() > 5.0);
    eventually("the agent serving more than one instance", WAIT, || {
        instances_gauge(&addr).filter(|n| *n > 1)
    });

    load.stop();
    let stopped_ms = common_now_ms();
    let down = eventually("the scale-down applied", Duration::from_secs(60), || {
        applied_set_instances(&agg).into_iter().find(|d| d["payload"]["instances"] == 1)
    });
    // Not before the 8 s window of higher recommendations had passed (the last one came while
    // the 3 s telemetry window still held load).
    let waited = down["created_ms"].as_i64().unwrap() - stopped_ms;
    assert!(waited >= 7_500, "scaled down {waited} ms after the load stopped");
    assert_eq!(instances_gauge(&addr), Some(1));
    let rules: Vec<String> = agg
        .cli_json(&["decisions", "--model", "ocr"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["rule"].as_str().unwrap().to_owned())
        .collect();
    assert!(rules.iter().any(|r| r == "stabilization.hold"), "{rules:?}");
}

/// An aggregator evaluating `policies` (written to `policies.toml`) every second over a 3 s
/// window.
fn aggregator_with_policies(fleet: &Fleet, policies: &str) -> Aggregator {
    std::fs::write(fleet.path().join("policies.toml"), policies).unwrap();
    let config = fleet.aggregator_config(0);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "[control]\npolicy_file = \"policies.toml\"\ninterval_secs = 1\nwindow_secs = 3\n",
    );
    std::fs::write(&config, text).unwrap();
    Aggregator::start(&config)
}

/// Closed-loop OCR clients against one agent, each sending a request every ~50 ms.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: &str, clients: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let body = std::sync::Arc::new(ocr_request());
        let clients = (0..clients)
            .map(|_| {
                let (stop, body, addr) = (stop.clone(), body.clone(), addr.to_owned());
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        post_quietly(&addr, "/v2/models/ocr/infer", &body);
                        std::thread::sleep(Duration::from_millis(50));
                    }
                })
            })
            .collect();
        Self { stop, clients }
    }

    /// Stops the clients and waits for them.
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in self.clients {
            c.join().unwrap();
        }
    }
}

/// POSTs `body` and reads the reply, whatever it is (load, not a check).
fn post_quietly(addr: &str, path: &str, body: &str) {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).and_then(|()| s.write_all(body.as_bytes())).is_ok() {
        let _ = s.read_to_end(&mut Vec::new());
    }
}

fn common_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[test]
fn a_crossed_auto_optimize_budget_records_directives_for_idle_models() {
    let fleet = Fleet::new();
    let config = fleet.aggregator_config_with_analytics(
        "cost_window_hours = 24\n\
         [[budgets]]\nname = \"tight\"\namount = 1.0\nperiod = \"day\"\nscope = \"fleet\"\n\
         auto_optimize = true\nthresholds = [{ pct = 50.0, on = \"forecast\", severity = \"critical\" }]\n\
         [[budgets]]\nname = \"flag-only\"\namount = 1.0\nperiod = \"day\"\nscope = \"fleet\"\n\
         thresholds = [{ pct = 50.0, on = \"forecast\", severity = \"warning\" }]\n",
    );
    let agg = Aggregator::start(&config);
    let now_ms = common_now_ms();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let labels = [("instance_type", "g5.12xlarge"), ("lifecycle", "on-demand")];
        // Three days of resnet traffic on gpu-a, then 30 idle hours.
        tokio::time::timeout(
            WAIT,
            crate::analytics::simulate(&fleet, &agg, "gpu-a", &labels, now_ms, 3, 30),
        )
        .await
        .expect("sending three days of telemetry");
    });

    let run = agg.cli_json(&["analytics", "run"]).unwrap();
    assert_eq!(run["auto_optimized"], 1, "{run}");
    let decisions = agg.cli_json(&["decisions", "--model", "resnet"]).unwrap();
    let decisions = decisions.as_array().unwrap();
    assert_eq!(decisions.len(), 1, "only the auto_optimize budget acts: {decisions:?}");
    let d = &decisions[0];
    assert_eq!(d["source"], "budget:tight", "{d}");
    assert_eq!(d["rule"], "auto_optimize.unload_idle", "{d}");
    assert!(d["inputs"]["idle_hours"].as_i64().unwrap() >= 24, "{d}");
    let directives =
        agg.cli_json(&["directives", "--decision", d["id"].as_str().unwrap()]).unwrap();
    let directives = directives.as_array().unwrap();
    assert_eq!(directives.len(), 1, "{directives:?}");
    assert_eq!(directives[0]["host"], "gpu-a");
    assert_eq!(directives[0]["kind"], "unload");
    assert_eq!(directives[0]["payload"]["model"], "resnet");
    // The desired state says it now, so the next pass does not decide it again.
    let again = agg.cli_json(&["analytics", "run"]).unwrap();
    assert_eq!(again["auto_optimized"], 0, "{again}");
}

#[test]
fn a_crossed_auto_optimize_budget_searches_a_busy_model_and_adopts_the_cheapest() {
    let fleet = Fleet::new();
    let config = fleet.aggregator_config_with_analytics(
        "cost_window_hours = 24\n\
         [[budgets]]\nname = \"tight\"\namount = 0.0001\nperiod = \"day\"\nscope = \"fleet\"\n\
         auto_optimize = true\nthresholds = [{ pct = 50.0, on = \"forecast\", severity = \"critical\" }]\n",
    );
    let agg = Aggregator::start(&config);
    let repo = fleet.path().join("models");
    install_ocr(&repo);
    // A priced host (so the search's cost figures use its rate) serving ocr under load.
    fleet.issue("node-1");
    let agent_config = fleet.agent_config("node-1", agg.quic, 500);
    let mut text = std::fs::read_to_string(&agent_config).unwrap();
    text.push_str(&format!(
        "[labels]\nhourly_cost_usd = \"2.5\"\n[serving]\nlisten = \"127.0.0.1:0\"\nmodel_repository = \"{}\"\n",
        repo.display()
    ));
    std::fs::write(&agent_config, text).unwrap();
    let _node = agent("node-1", &agent_config);
    let addr = e2e::inference_addr(&_node);
    online(&agg, "node-1");
    // Three days of another host's spending cross the fleet budget (that host's model has
    // been idle for 30 hours: it gets its own unload decision, not a search).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let labels = [("instance_type", "g5.12xlarge"), ("lifecycle", "on-demand")];
        tokio::time::timeout(
            WAIT,
            crate::analytics::simulate(&fleet, &agg, "gpu-a", &labels, common_now_ms(), 3, 30),
        )
        .await
        .expect("sending three days of telemetry");
    });
    let load = Load::start(&addr, 2);
    // Once the model's requests are in the recent window, a pass asks for a cost search on the
    // busy model.
    let d = eventually("the budget asks for a search", WAIT, || {
        agg.cli_json(&["analytics", "run"]).ok()?;
        let decisions = agg.cli_json(&["decisions", "--model", "ocr"]).ok()?;
        decisions.as_array()?.iter().find(|d| d["rule"] == "auto_optimize.optimize_cost").cloned()
    });
    assert_eq!(d["source"], "budget:tight", "{d}");
    assert!(d["reason"].as_str().unwrap().contains("a cost search at 2.5 per hour"), "{d}");
    // The aggregator follows the search to its report; the winner is adopted.
    let record = eventually("the budget's search followed to its report", WAIT * 4, || {
        let r = agg.cli_json(&["optimizations", "node-1", "ocr"]).ok()?;
        (r["state"] != "running").then_some(r)
    });
    load.stop();
    assert_eq!(record["state"], "done", "{record}");
    let report = &record["agent"]["report"];
    assert_eq!(report["strategy"], "cost", "{record}");
    assert!(report["why"].as_str().unwrap().contains("at 2.5 per hour"), "{record}");
    let adopted = record["agent"]["adopted"].as_str().unwrap();
    assert!(adopted.starts_with("now serving "), "{record}");
    // With more than one core the winner was timed with instances at once, and the count
    // chosen was adopted with it.
    if cpus_listed() > 1 {
        let instances = report["instances"].as_array().unwrap();
        assert_eq!(instances[0]["instances"], 1, "{record}");
        let chosen = report["instances_chosen"].as_u64().unwrap();
        if chosen > 1 {
            assert!(adopted.contains(&format!("instances 1 -> {chosen}")), "{record}");
            let config: Value =
                serde_json::from_str(&http_get(&addr, "/v2/models/ocr/config")).unwrap();
            assert_eq!(config["instance_group"][0]["count"], chosen, "{config}");
        }
    }
    // Asked once: the next pass does not ask again for a model searched this week.
    let again = agg.cli_json(&["analytics", "run"]).unwrap();
    assert_eq!(again["auto_optimized"], 0, "{again}");
    assert!(http_get(&addr, "/v2/models/ocr/ready").contains("true"));
}

/// Logical CPUs as the agent counts them (the `cpuN` lines of /proc/stat).
fn cpus_listed() -> u32 {
    std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u32
}

#[test]
fn a_model_its_host_cannot_hold_is_loaded_on_another_host_and_the_rest_goes_to_the_fleet_actuator()
{
    let fleet = Fleet::new();
    let repo_a = fleet.path().join("models-a");
    install_ocr(&repo_a);
    let repo_b = fleet.path().join("models-b");
    std::fs::create_dir_all(&repo_b).unwrap();
    // One instance takes every core a host has: each host holds one.
    let cores = cpus_listed();
    let requests = fleet.path().join("fleet-requests.jsonl");
    let agg = aggregator_with_policies(
        &fleet,
        &format!(
            "[[policy]]\nname = \"ocr-place\"\nmodel = \"ocr\"\nmode = \"reactive\"\n\
             min_instances = 1\nmax_instances = 8\n\
             scale_up_limit = {{ instances = 8, per_secs = 1 }}\n\
             [policy.targets]\nrequests_per_instance = 2.0\n\
             [policy.resources]\ncpu_cores = {cores}.0\n\
             [fleet]\ncommand = [\"sh\", \"-c\", \"cat >> {}; echo >> {}; echo queued\"]\n",
            requests.display(),
            requests.display()
        ),
    );
    let (_a, addr_a) = serving_agent(&fleet, "node-a", agg.quic, &repo_a, 500);
    let (_b, addr_b) = serving_agent(&fleet, "node-b", agg.quic, &repo_b, 500);
    online(&agg, "node-a");
    online(&agg, "node-b");
    let inventory = agg.cli_json(&["host", "node-a"]).unwrap();
    assert_eq!(inventory["inventory"]["cpu_cores"], cores, "{inventory}");
    // The model is staged on node-b's disk but not loaded there.
    install_ocr(&repo_b);

    let load = Load::start(&addr_a, 4);
    let placed = eventually("a placement decision", WAIT, || {
        let list = agg.cli_json(&["decisions", "--model", "ocr"]).ok()?;
        list.as_array()?.iter().find(|d| d["rule"] == "allocation.place").cloned()
    });
    assert_eq!(placed["inputs"]["host"], "node-b", "{placed}");
    // node-b loads the model and serves one instance.
    let directives = eventually("node-b applied load and set_instances", WAIT, || {
        let list =
            agg.cli_json(&["directives", "--decision", placed["id"].as_str().unwrap()]).ok()?;
        let list = list.as_array()?.clone();
        list.iter().all(|d| d["state"] == "applied").then_some(list)
    });
    let kinds: Vec<&str> = directives.iter().rev().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["load", "set_instances"], "{directives:?}");
    eventually("node-b serving ocr", WAIT, || instances_gauge(&addr_b).filter(|n| *n == 1));
    // What neither host holds goes to the fleet actuator, and its answer is recorded.
    let asked = eventually("the fleet actuator's recorded outcome", WAIT, || {
        let list = agg.cli_json(&["decisions", "--model", "ocr"]).ok()?;
        list.as_array()?
            .iter()
            .find(|d| d["rule"] == "fleet.add_hosts" && d["outcome"].is_object())
            .cloned()
    });
    load.stop();
    assert_eq!(asked["outcome"]["ok"], true, "{asked}");
    assert_eq!(asked["outcome"]["output"], "queued\n", "{asked}");
    let line = std::fs::read_to_string(&requests).unwrap();
    let request: Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(request["action"], "add_hosts");
    assert_eq!(request["model"], "ocr");
    assert_eq!(request["decision"], asked["id"]);
    assert!(request["instances"].as_u64().unwrap() >= 1, "{request}");
    // node-a was never asked for more than its capacity holds.
    let on_a = agg.cli_json(&["directives", "--host", "node-a"]).unwrap();
    assert!(
        on_a.as_array().unwrap().iter().all(|d| d["payload"]["instances"].as_u64() <= Some(1)),
        "{on_a}"
    );
    let text = String::from_utf8(agg.cli(&["policies"]).stdout).unwrap();
    assert!(text.contains("ocr-place -> model ocr"), "{text}");
    // Once node-b reports the model, its own evaluation shows beside node-a's.
    eventually("node-b evaluated by the policy", WAIT, || {
        let view = agg.cli_json(&["policies"]).ok()?;
        let hosts = view["policies"][0]["hosts"].as_array()?.clone();
        (hosts.len() == 2).then_some(hosts)
    });
}

#[test]
fn flotilla_optimize_runs_a_search_on_the_host_and_shows_its_report() {
    let fleet = Fleet::new();
    let repo = fleet.path().join("models");
    install_ocr(&repo);
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let (_node, addr) = serving_agent(&fleet, "node-1", agg.quic, &repo, 500);
    online(&agg, "node-1");
    // A quick latency search of one-row batches; `--apply` and `--json` are added below.
    let search = |more: &[&'static str]| {
        let mut args = vec![
            "optimize",
            "node-1",
            "ocr",
            "--strategy",
            "latency",
            "--rounds",
            "3",
            "--cpu-share",
            "1",
            "--max-batch",
            "1",
        ];
        args.extend_from_slice(more);
        args
    };
    // Started with --no-follow: the aggregator still follows it to its report and keeps it.
    let out = agg.cli(&search(&["--no-follow"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let kept = eventually("the search followed to its report", WAIT, || {
        let record = agg.cli_json(&["optimizations", "node-1", "ocr"]).ok()?;
        (record["state"] == "done").then_some(record)
    });
    assert_eq!(kept["agent"]["report"]["strategy"], "latency", "{kept}");
    // A latency search chooses no instance count, but the baseline's figures per count are
    // measured all the same where there is more than one core.
    if cpus_listed() > 1 {
        let base = kept["agent"]["report"]["baseline_instances"].as_array().unwrap();
        assert_eq!(base[0]["instances"], 1, "{kept}");
        assert!(kept["agent"]["report"]["instances_chosen"].is_null(), "{kept}");
    }
    // Followed by the CLI to its report.
    let out = agg.cli(&search(&[]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("latency strategy"), "{text}");
    assert!(text.contains("tract") && text.contains("timed"), "{text}");
    assert!(text.contains("Winner: ") && text.contains("lowest p99 at one row"), "{text}");
    // The report is kept by the aggregator and shown again, as JSON.
    let state = agg.cli_json(&["optimizations", "node-1", "ocr"]).unwrap();
    assert_eq!(state["state"], "done", "{state}");
    assert_ne!(state["directive"], kept["directive"], "the latest search first: {state}");
    let steps = state["agent"]["report"]["steps"].as_array().unwrap();
    assert_eq!(steps[0]["candidate"], "tract");
    assert_eq!(steps[0]["timings"][0]["runs"], 3);
    // The generic directive carries the same request, options nested by the CLI.
    let d = send(&agg, "node-1", "optimize", &["model=ocr", "strategy=fastest"], 30);
    assert_eq!(d["state"], "rejected", "{d}");
    assert!(d["message"].as_str().unwrap().contains("strategy \"fastest\""), "{d}");
    // Adopted: the agent reloads the model on the winner; rolled back: on its config again.
    let engine_now = || -> String {
        let config: Value =
            serde_json::from_str(&http_get(&addr, "/v2/models/ocr/config")).unwrap();
        config["engine"]["engine"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(engine_now(), "tract");
    // The control loop's instance count survives the adoption's reload (a latency search
    // chooses none of its own) and the rollback's.
    let d = send(&agg, "node-1", "set_instances", &["model=ocr", "instances=2"], 30);
    assert_eq!(d["state"], "applied", "{d}");
    let instances_now = || -> Value {
        let config: Value =
            serde_json::from_str(&http_get(&addr, "/v2/models/ocr/config")).unwrap();
        config["instance_group"][0]["count"].clone()
    };
    let record = agg.cli_json(&search(&["--apply"])).unwrap();
    assert_eq!(instances_now(), 2, "{record}");
    let state = &record["agent"];
    let report = &state["report"];
    let winner = report["winner"].as_str().unwrap();
    let step =
        report["steps"].as_array().unwrap().iter().find(|s| s["candidate"] == winner).unwrap();
    let adopted = state["adopted"].as_str().unwrap();
    eprintln!("adopted: {adopted}");
    assert!(adopted.starts_with(&format!("now serving {winner}")), "{state}");
    let engine = step["engine"].as_str().unwrap();
    let kind = engine.split([':', '@']).next().unwrap().to_owned();
    assert_eq!(engine_now(), kind, "{state}");
    if kind == "onnxruntime" {
        // The winner's graph optimization level is served too (`@LEVEL`, else `all`).
        let level = engine.split_once('@').map_or("all", |(_, l)| l);
        let config: Value =
            serde_json::from_str(&http_get(&addr, "/v2/models/ocr/config")).unwrap();
        assert_eq!(config["engine"]["graph_optimization"], level, "{config}");
    }
    let out = agg.cli(&["optimize", "rollback", "node-1", "ocr"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("is back on its configured engine"), "{text}");
    assert_eq!(engine_now(), "tract");
    assert_eq!(instances_now(), 2);
    // Every search of the fleet is listed; the adopted one notes its rollback.
    let all = agg.cli_json(&["optimizations"]).unwrap();
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.iter().all(|r| r["state"] == "done" && r["host"] == "node-1"), "{all:?}");
    assert!(all[0]["note"].as_str().unwrap().starts_with("rolled back:"), "{all:?}");
    let text = String::from_utf8(agg.cli(&["optimizations", "node-1"]).stdout).unwrap();
    assert!(text.contains("winner ") && text.contains("rolled back"), "{text}");
    let out = agg.cli(&["optimize", "rollback", "node-1", "ocr"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to roll back"));
    // Unknown models are refused by name, and the model served on throughout.
    let out = agg.cli(&["optimize", "node-1", "nosuch"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nosuch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(http_get(&addr, "/v2/models/ocr/ready").contains("true"));
}
