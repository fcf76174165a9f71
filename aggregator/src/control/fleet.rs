//! The fleet-size actuator: adding or removing hosts is not something an agent can do, so the
//! autoscaler hands such a decision to what the operator configured in the policy file's
//! `[fleet]` table: a command (the request as JSON on its standard input) or a webhook (the
//! request as a JSON POST). Its result (exit status or HTTP status, and the tail of what it
//! said) is recorded on the decision (`outcome`, shown by `flotilla decisions`).
//!
//! When it is asked:
//! - `add_hosts`: a policy's instances that neither their host nor any other host it selects
//!   can hold (see [`super::placement`]); at most once per policy per `cooldown_secs`.
//! - `remove_host`: a host a policy selects that has served no model instance for
//!   `idle_host_secs`; once per host until it serves again.
//!
//! Invariants:
//! - The actuator runs on a blocking thread, bounded by `timeout_secs` (a command still running
//!   then is killed); the evaluation that asked does not wait for it.
//! - The decision is recorded before the actuator runs, so a crash in between leaves a decision
//!   without an outcome (shown as such), never an actuation without a decision.
//! - The command's output is read as it comes (no pipe can fill up and stall it) and at most
//!   [`OUTPUT_TAIL`] bytes of it are kept.
//! - The command runs in a process group of its own; on timeout the whole group is killed, so
//!   a shell's children cannot hold its output open (and the reader threads) past the timeout.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::policy::Resources;

/// Bytes of a command's output (or a webhook's answer) kept in the outcome.
pub const OUTPUT_TAIL: usize = 4096;

/// `[fleet]` in the policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetActuator {
    /// Program and arguments; it gets the request as JSON on standard input.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// URL that gets the request as a JSON POST.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// Longest time one actuation may take, seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Fewest seconds between two `add_hosts` requests of one policy.
    #[serde(default = "default_cooldown")]
    pub cooldown_secs: u64,
    /// A host idle (no model instance) this long is proposed for removal, seconds.
    #[serde(default = "default_idle_host")]
    pub idle_host_secs: u64,
}

fn default_timeout() -> u64 {
    30
}
fn default_cooldown() -> u64 {
    600
}
fn default_idle_host() -> u64 {
    3600
}

impl FleetActuator {
    /// Problems with the table, each naming `fleet.KEY`, the value and what is allowed.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        match (&self.command, &self.webhook_url) {
            (None, None) | (Some(_), Some(_)) => p.push(
                "fleet: set exactly one of command = [\"program\", \"arg\"...] or \
                 webhook_url = \"http://...\""
                    .to_owned(),
            ),
            (Some(c), None) if c.first().is_none_or(|prog| prog.trim().is_empty()) => {
                p.push(format!("fleet.command = {c:?} has no program; name one first"));
            }
            (None, Some(u)) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                p.push(format!("fleet.webhook_url = {u:?} is not an http:// or https:// URL"));
            }
            _ => {}
        }
        for (key, v, least, most) in [
            ("timeout_secs", self.timeout_secs, 1, 600),
            ("cooldown_secs", self.cooldown_secs, 0, 86_400),
            ("idle_host_secs", self.idle_host_secs, 60, 604_800),
        ] {
            if !(least..=most).contains(&v) {
                p.push(format!("fleet.{key} = {v} is out of range; allowed {least}..={most}"));
            }
        }
        p
    }
}

/// What the fleet should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetAction {
    /// Add hosts matching `host_labels` with room for `instances` of `per_instance`.
    AddHosts,
    /// Remove `host`.
    RemoveHost,
}

impl FleetAction {
    /// The decision rule that asks for it.
    pub fn rule(self) -> &'static str {
        match self {
            Self::AddHosts => "fleet.add_hosts",
            Self::RemoveHost => "fleet.remove_host",
        }
    }
}

/// The JSON the actuator receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetRequest {
    /// Always `flotilla`.
    pub source: String,
    /// The decision's id (look it up with `flotilla decisions`).
    pub decision: String,
    /// What to do.
    pub action: FleetAction,
    /// The policy that asked (`add_hosts`).
    pub policy: Option<String>,
    /// Its model.
    pub model: Option<String>,
    /// Labels the new hosts need (the policy's host selector).
    pub host_labels: BTreeMap<String, String>,
    /// The host to remove (`remove_host`).
    pub host: Option<String>,
    /// Instances that found no room (`add_hosts`).
    pub instances: u32,
    /// What one instance needs.
    pub per_instance: Resources,
    /// A sentence with the numbers.
    pub reason: String,
    /// Decided at, Unix ms.
    pub at_ms: i64,
}

/// What the actuator answered; recorded on the decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// It ran and succeeded (exit 0, or an HTTP 2xx).
    pub ok: bool,
    /// `command` or `webhook`.
    pub via: String,
    /// The exit code, when the command exited.
    pub exit_code: Option<i32>,
    /// The HTTP status, when the webhook answered.
    pub http_status: Option<u16>,
    /// What went wrong, or `done`.
    pub detail: String,
    /// The last [`OUTPUT_TAIL`] bytes of its output or answer.
    pub output: String,
    /// How long it took, ms.
    pub elapsed_ms: u64,
}

/// Runs the actuator for `request`; blocking, bounded by `timeout_secs`.
pub fn actuate(actuator: &FleetActuator, request: &FleetRequest) -> Outcome {
    let started = Instant::now();
    let timeout = Duration::from_secs(actuator.timeout_secs);
    let body = serde_json::to_vec(request).unwrap_or_default();
    let mut outcome = match (&actuator.command, &actuator.webhook_url) {
        (Some(command), _) => run_command(command, &body, request.action, timeout),
        (None, Some(url)) => post(url, &body, timeout),
        (None, None) => Outcome {
            ok: false,
            via: "none".into(),
            exit_code: None,
            http_status: None,
            detail: "no fleet actuator is configured".into(),
            output: String::new(),
            elapsed_ms: 0,
        },
    };
    outcome.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    outcome
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(OUTPUT_TAIL);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// How long the output is waited for once the command has exited or been killed (a process
/// that left the group may still hold it open).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Reads `from` to the end on a thread of its own, keeping the last `2 * OUTPUT_TAIL` bytes;
/// the receiver gets them at the end.
fn drain(mut from: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 2 * OUTPUT_TAIL {
                kept.drain(..kept.len() - OUTPUT_TAIL);
            }
        }
        let _ = tx.send(kept);
    });
    rx
}

fn run_command(command: &[String], body: &[u8], action: FleetAction, timeout: Duration) -> Outcome {
    let failed = |detail: String| Outcome {
        ok: false,
        via: "command".into(),
        exit_code: None,
        http_status: None,
        detail,
        output: String::new(),
        elapsed_ms: 0,
    };
    let Some((program, args)) = command.split_first() else {
        return failed("fleet.command is empty".into());
    };
    use std::os::unix::process::CommandExt as _;
    let spawned = Command::new(program)
        .args(args)
        .process_group(0)
        .env(
            "FLOTILLA_FLEET_ACTION",
            serde_json::to_value(action)
                .map_or_else(|_| String::new(), |v| v.as_str().unwrap_or_default().to_owned()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return failed(format!("starting {program:?}: {e}")),
    };
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    if let Some(mut stdin) = child.stdin.take() {
        // A program that does not read its input is fine; it still ran.
        let _ = stdin.write_all(body);
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                // The group's id is the leader's pid (process_group(0) above).
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return failed(format!("waiting for {program:?}: {e}")),
        }
    };
    let grace = Instant::now() + OUTPUT_GRACE;
    let collect = |rx: Option<std::sync::mpsc::Receiver<Vec<u8>>>| {
        rx.and_then(|rx| rx.recv_timeout(grace.saturating_duration_since(Instant::now())).ok())
            .unwrap_or_default()
    };
    let mut output = collect(out);
    output.extend(collect(err));
    let (ok, exit_code, detail) = match status {
        Some(s) if s.success() => (true, s.code(), "done".to_owned()),
        Some(s) => (false, s.code(), format!("{program:?} failed: {s}")),
        None => {
            (false, None, format!("{program:?} ran past {} s and was killed", timeout.as_secs()))
        }
    };
    Outcome {
        ok,
        via: "command".into(),
        exit_code,
        http_status: None,
        detail,
        output: tail(&output),
        elapsed_ms: 0,
    }
}

fn post(url: &str, body: &[u8], timeout: Duration) -> Outcome {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .user_agent(concat!("flotilla-aggregator/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent();
    let answer = agent.post(url).header("content-type", "application/json").send(body);
    match answer {
        Ok(mut r) => {
            let status = r.status();
            let text = r
                .body_mut()
                .with_config()
                .limit(OUTPUT_TAIL as u64 * 4)
                .read_to_vec()
                .map(|b| tail(&b))
                .unwrap_or_default();
            Outcome {
                ok: status.is_success(),
                via: "webhook".into(),
                exit_code: None,
                http_status: Some(status.as_u16()),
                detail: if status.is_success() {
                    "done".into()
                } else {
                    format!("POST {url}: answered {status}")
                },
                output: text,
                elapsed_ms: 0,
            }
        }
        Err(e) => Outcome {
            ok: false,
            via: "webhook".into(),
            exit_code: None,
            http_status: None,
            detail: format!("POST {url}: {e}"),
            output: String::new(),
            elapsed_ms: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> FleetRequest {
        FleetRequest {
            source: "flotilla".into(),
            decision: "7-42".into(),
            action: FleetAction::AddHosts,
            policy: Some("ocr".into()),
            model: Some("ocr".into()),
            host_labels: [("pool".to_owned(), "gpu".to_owned())].into(),
            host: None,
            instances: 3,
            per_instance: Resources { gpu_memory_mb: Some(20_000.0), cpu_cores: None },
            reason: "3 instances found no room".into(),
            at_ms: 1,
        }
    }

    fn command(script: &str) -> FleetActuator {
        FleetActuator {
            command: Some(vec!["sh".into(), "-c".into(), script.into()]),
            webhook_url: None,
            timeout_secs: 5,
            cooldown_secs: 600,
            idle_host_secs: 3600,
        }
    }

    #[test]
    fn a_command_gets_the_request_on_stdin_and_its_output_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("got.json");
        let script = format!("cat > {}; echo \"$FLOTILLA_FLEET_ACTION ok\"", file.display());
        let o = actuate(&command(&script), &request());
        assert!(o.ok, "{o:?}");
        assert_eq!((o.exit_code, o.output.as_str()), (Some(0), "add_hosts ok\n"));
        let got: FleetRequest = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(got, request());
    }

    #[test]
    fn a_failing_missing_or_stuck_command_is_an_outcome_not_a_hang() {
        let o = actuate(&command("echo no capacity >&2; exit 3"), &request());
        assert!(!o.ok);
        assert_eq!((o.exit_code, o.output.as_str()), (Some(3), "no capacity\n"));
        let mut missing = command("");
        missing.command = Some(vec!["/nonexistent/flotilla-scaler".into()]);
        let o = actuate(&missing, &request());
        assert!(!o.ok && o.detail.contains("starting \"/nonexistent/flotilla-scaler\""), "{o:?}");
        let mut stuck = command("sleep 30");
        stuck.timeout_secs = 1;
        let o = actuate(&stuck, &request());
        assert!(!o.ok && o.detail.contains("ran past 1 s and was killed"), "{o:?}");
        assert!(o.elapsed_ms < 10_000, "{o:?}");
    }

    #[test]
    fn a_chatty_command_keeps_only_the_tail() {
        let o = actuate(&command("yes flotilla | head -c 1000000; echo END"), &request());
        assert!(o.ok, "{o:?}");
        assert!(o.output.len() <= OUTPUT_TAIL && o.output.ends_with("END\n"), "{}", o.output.len());
    }

    #[test]
    fn a_webhook_gets_the_request_as_json_and_its_status_is_recorded() {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/scale", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Read the head and the body (Content-Length).
            loop {
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap();
                    if body.len() >= len {
                        break;
                    }
                }
            }
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\nConnection: close\r\n\r\nno quota\n").unwrap();
            String::from_utf8(got).unwrap()
        });
        let mut hook = command("");
        hook.command = None;
        hook.webhook_url = Some(url);
        let o = actuate(&hook, &request());
        let got = server.join().unwrap();
        assert!(got.starts_with("POST /scale"), "{got}");
        assert!(got.contains("\"action\":\"add_hosts\""), "{got}");
        assert!(!o.ok);
        assert_eq!((o.http_status, o.output.as_str()), (Some(503), "no quota\n"));
    }

    #[test]
    fn the_table_names_what_is_wrong() {
        let mut a = command("true");
        a.webhook_url = Some("ftp://x".into());
        a.timeout_secs = 0;
        let p = a.problems().join("\n");
        assert!(p.contains("set exactly one of command"), "{p}");
        assert!(p.contains("fleet.timeout_secs = 0 is out of range; allowed 1..=600"), "{p}");
        a.command = None;
        assert!(a.problems().join("\n").contains("fleet.webhook_url = \"ftp://x\""));
    }
}
