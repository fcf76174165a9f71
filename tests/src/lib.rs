//! The end-to-end harness: real binaries, real certificates, real QUIC, on loopback.
//!
//! Each part is a child process of the test, started from the binaries next to the test
//! executable (`cargo build --bins` first). Parts report their bound addresses in their logs,
//! which the harness reads; nothing guesses ports. Every wait has a timeout, and a failing test
//! prints the logs of every part it started.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use common::ids::HostId;
use common::tls::{self, Ca};

pub mod cases;
pub mod chaos;
pub mod relay;

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// Path of a workspace binary, next to the test executable's `deps/` directory (or next to
/// the running executable, for the benches that drive these scenarios).
pub fn bin(name: &str) -> PathBuf {
    if let Ok(path) = chaos::binary(name) {
        return path;
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().and_then(Path::parent).map(Path::to_owned).unwrap_or_default();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` before the e2e tests",
        path.display()
    );
    path
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A test fleet's directory: a CA, certificates, configs, data.
#[derive(Debug)]
pub struct Fleet {
    /// Root directory (deleted on drop).
    pub dir: tempfile::TempDir,
}

impl Fleet {
    /// A fresh fleet with a CA in `tls/`.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        tls::init_ca_dir(&dir.path().join("tls"), &[], 30, false).expect("ca init");
        Self { dir }
    }

    /// The root path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The CA.
    pub fn ca(&self) -> Ca {
        Ca::load(&self.path().join("tls")).expect("load CA")
    }

    /// Issues a valid certificate for `host` into `tls/HOST.pem|key`.
    pub fn issue(&self, host: &str) -> (PathBuf, PathBuf) {
        let tls_dir = self.path().join("tls");
        tls::issue_host_files(&tls_dir, &HostId::new(host).expect("host id"), &tls_dir, 30, true)
            .expect("issue")
    }

    /// Writes an aggregator config on `quic_port` (0 = any) and returns its path.
    pub fn aggregator_config(&self, quic_port: u16) -> PathBuf {
        let path = self.path().join("aggregator.toml");
        let text = format!(
            "[listen]\nquic = \"127.0.0.1:{quic_port}\"\nadmin = \"127.0.0.1:0\"\n\
             [tls]\nca_cert = \"tls/ca.pem\"\ncert = \"tls/server.pem\"\nkey = \"tls/server.key\"\n\
             [store]\npath = \"store\"\n[ingest]\noffline_after_secs = 5\n"
        );
        std::fs::write(&path, text).expect("write aggregator config");
        path
    }

    /// Writes an agent config for `host` (certificate `tls/HOST.pem` unless `cert` is given)
    /// dialing `aggregator`, sampling every `sample_ms` and uplinking every second.
    pub fn agent_config(
        &self,
        host: &str,
        aggregator: std::net::SocketAddr,
        sample_ms: u64,
    ) -> PathBuf {
        let path = self.path().join(format!("agent-{host}.toml"));
        let text = format!(
            "[uplink]\naggregator = \"{aggregator}\"\ninterval_secs = 1\nbackoff_initial_ms = 100\nbackoff_max_ms = 1000\n\
             [tls]\nca_cert = \"tls/ca.pem\"\ncert = \"tls/{host}.pem\"\nkey = \"tls/{host}.key\"\n\
             [telemetry]\nsample_interval_ms = {sample_ms}\n\
             [spool]\npath = \"spool-{host}\"\n"
        );
        std::fs::write(&path, text).expect("write agent config");
        path
    }
}

impl Fleet {
    /// Writes `policy` as `analytics.toml` and an aggregator config that reads it, with a
    /// schedule that never fires during a test (passes are run through the CLI); returns the
    /// config's path.
    pub fn aggregator_config_with_analytics(&self, policy: &str) -> PathBuf {
        std::fs::write(self.path().join("analytics.toml"), policy).expect("write analytics.toml");
        let config = self.aggregator_config(0);
        let mut text = std::fs::read_to_string(&config).expect("read aggregator config");
        text.push_str(
            "[analytics]\npolicy_file = \"analytics.toml\"\nschedule = \"0 0 0 1 1 *\"\n",
        );
        std::fs::write(&config, text).expect("write aggregator config");
        config
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

/// A running child process whose stderr (logs) is collected.
#[derive(Debug)]
pub struct Proc {
    /// Name for messages.
    pub name: String,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `program args` with logs captured.
    pub fn spawn(name: &str, program: &Path, args: &[&str]) -> Self {
        Self::spawn_env(name, program, args, &[])
    }

    /// [`Self::spawn`] with environment changes: `(name, Some(value))` sets, `(name, None)`
    /// removes.
    pub fn spawn_env(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> Self {
        let mut command = Command::new(program);
        for (key, value) in env {
            match value {
                Some(v) => command.env(key, v),
                None => command.env_remove(key),
            };
        }
        let mut child = command
            .args(args)
            .env("FLOTILLA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
        let logs = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    logs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line);
                }
            });
        }
        Self { name: name.to_owned(), child, logs }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The first log line containing every needle, waiting up to [`WAIT`].
    pub fn wait_for_log(&self, needles: &[&str]) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) =
                self.logs().into_iter().find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return line;
            }
            if start.elapsed() > WAIT {
                panic!(
                    "{}: no log line with {needles:?} within {WAIT:?}; logs:\n{}",
                    self.name,
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.wait()
    }

    /// Sends SIGKILL and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit (up to [`WAIT`], then kills it and fails).
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the log readers catch the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if start.elapsed() > WAIT {
                self.kill();
                panic!(
                    "{} did not exit within {WAIT:?}; logs:\n{}",
                    self.name,
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Prints the logs (on failure paths).
    pub fn dump(&self) {
        eprintln!("----- {} -----\n{}", self.name, self.logs().join("\n"));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running aggregator process.
#[derive(Debug)]
pub struct Aggregator {
    /// The process.
    pub proc: Proc,
    /// Bound QUIC address.
    pub quic: std::net::SocketAddr,
    /// Admin API base URL.
    pub api: String,
}

impl Aggregator {
    /// Starts `flotilla-aggregator` on `config` and reads its bound addresses from its log.
    pub fn start(config: &Path) -> Self {
        let proc = Proc::spawn(
            "aggregator",
            &bin("flotilla-aggregator"),
            &["--config", &config.display().to_string()],
        );
        let line = proc.wait_for_log(&["Aggregator started."]);
        let field = |name: &str| -> String {
            let start = line.find(&format!("{name}=")).map(|i| i + name.len() + 1).unwrap_or(0);
            line[start..].split_whitespace().next().unwrap_or_default().to_owned()
        };
        let quic = field("quic").parse().unwrap_or_else(|e| panic!("quic addr in {line:?}: {e}"));
        let api = format!("http://{}", field("admin"));
        Self { proc, quic, api }
    }

    /// Runs the `flotilla` CLI against this aggregator.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.api, args)
    }

    /// Runs `flotilla ARGS --json` and parses stdout, failing on a non-zero exit.
    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        if !out.status.success() {
            bail!("flotilla {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).context("parsing CLI JSON")
    }
}

/// Runs the `flotilla` CLI with `--api api`.
pub fn cli(api: &str, args: &[&str]) -> Output {
    Command::new(bin("flotilla"))
        .args(["--api", api])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running flotilla")
}

/// Starts an agent process for `host` with `config`.
pub fn agent(host: &str, config: &Path) -> Proc {
    Proc::spawn(
        &format!("agent {host}"),
        &bin("flotilla-agent"),
        &["--config", &config.display().to_string()],
    )
}

/// Reads `samples_produced=N` from an agent's "Agent stopped." log line.
pub fn samples_produced(agent: &Proc) -> u64 {
    let line = agent.wait_for_log(&["Agent stopped."]);
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("samples_produced="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no samples_produced in {line:?}"))
}

/// A QUIC client endpoint presenting `cert_pem`/`key_pem` and trusting `ca_pem`.
pub fn quic_client(ca_pem: &str, cert_pem: &str, key_pem: &str) -> quinn::Endpoint {
    let tls = tls::client_config_pem(ca_pem, cert_pem, key_pem).expect("client tls");
    common::quic::client_endpoint("127.0.0.1:0".parse().expect("addr"), tls)
        .expect("client endpoint")
}

/// POSTs a JSON body over plain HTTP/1.1 and parses the JSON reply, failing on a non-200.
pub fn http_post_json(addr: &str, path: &str, body: &str) -> serde_json::Value {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, reply) = out.split_once("\r\n\r\n").expect("HTTP reply");
    assert!(head.starts_with("HTTP/1.1 2"), "POST {path}: {head}\n{reply}");
    serde_json::from_str(reply).expect("JSON reply")
}

/// A plain HTTP/1.1 GET over a socket, as a scraper does, to `addr` (`host:port`, with or
/// without `http://`); returns the body and fails the test on anything but 200.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let addr = addr.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}\n{body}");
    body.to_owned()
}

/// Starts an agent for `host` (certificate issued here) uplinking to `quic`, sampling every
/// `sample_ms`, serving the model repository `repo` on port 0; returns it and its inference
/// API address (read from its log).
pub fn serving_agent(
    fleet: &Fleet,
    host: &str,
    quic: std::net::SocketAddr,
    repo: &Path,
    sample_ms: u64,
) -> (Proc, String) {
    serving_agent_env(fleet, host, quic, repo, sample_ms, &[])
}

/// [`serving_agent`] with environment changes, as [`Proc::spawn_env`] takes them.
pub fn serving_agent_env(
    fleet: &Fleet,
    host: &str,
    quic: std::net::SocketAddr,
    repo: &Path,
    sample_ms: u64,
    env: &[(&str, Option<&str>)],
) -> (Proc, String) {
    fleet.issue(host);
    let config = fleet.agent_config(host, quic, sample_ms);
    let mut text = std::fs::read_to_string(&config).expect("read agent config");
    text.push_str(&format!(
        "[serving]\nlisten = \"127.0.0.1:0\"\nmodel_repository = \"{}\"\n",
        repo.display()
    ));
    std::fs::write(&config, text).expect("write agent config");
    let proc = Proc::spawn_env(
        &format!("agent {host}"),
        &bin("flotilla-agent"),
        &["--config", &config.display().to_string()],
        env,
    );
    let addr = inference_addr(&proc);
    (proc, addr)
}

/// Runs `tests/python/SCRIPT --url ADDR --repo REPO --cases CASES` with the venv's Python
/// (tritonclient) and returns its stdout; a failure dumps `agent`'s log and fails the test with
/// the script's output.
pub fn python_check(script: &str, addr: &str, repo: &Path, cases: &Path, agent: &Proc) -> String {
    let python = venv().join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/test, which makes the venv with tritonclient[http]",
        python.display()
    );
    let out = Command::new(python)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python").join(script))
        .args(["--url", addr, "--repo"])
        .arg(repo)
        .arg("--cases")
        .arg(cases)
        .output()
        .expect("running the Python check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    if !out.status.success() {
        agent.dump();
        panic!("{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(stdout.contains("all checks passed"), "{stdout}");
    stdout
}

/// Puts `file` into a model repository as `repo/name/1/model.onnx` with `config` as its
/// `config.toml`.
pub fn install(repo: &Path, name: &str, file: &Path, config: &str) {
    let dir = repo.join(name).join("1");
    std::fs::create_dir_all(&dir).expect("make the version directory");
    std::fs::copy(file, dir.join("model.onnx")).expect("copy the model");
    std::fs::write(repo.join(name).join("config.toml"), config).expect("write config.toml");
}

/// The checkout's `.venv`, which `scripts/test` makes.
pub fn venv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv")
}

/// libonnxruntime.so from the onnxruntime wheel `scripts/test` installs into `.venv`.
pub fn onnxruntime_library() -> PathBuf {
    let lib = venv().join("lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|pythons| {
        pythons.flatten().find_map(|python| {
            let capi = python.path().join("site-packages/onnxruntime/capi");
            std::fs::read_dir(capi).ok()?.flatten().map(|e| e.path()).find(|p| {
                p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so"))
            })
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "no onnxruntime wheel under {}: run ./scripts/test, which installs it",
            lib.display()
        )
    })
}

/// The inference API address a serving agent logged.
pub fn inference_addr(proc: &Proc) -> String {
    let line = proc.wait_for_log(&["Inference API listening."]);
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr in {line:?}"))
        .to_owned()
}

/// The shared development models, beside the checkout.
pub fn shared_model(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/models").join(file)
}
