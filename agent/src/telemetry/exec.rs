//! The exec accelerator source: runs an operator's command once per sample and reads its
//! standard output as JSON lines, one device per line:
//!
//! ```text
//! {"device": "card0", "metrics": {"temp_c": 55.0, "power_mw": 21000}}
//! ```
//!
//! Metric names should be snake_case with a unit suffix (`temp_c`, `power_mw`, `util_pct`).
//! Readings carry the source `exec:NAME`.
//!
//! Invariants:
//! - A run never takes much longer than its timeout: the child is polled with `try_wait` and
//!   killed at the deadline. Its stdout is drained on a helper thread so a chatty command cannot
//!   block on a full pipe; at most [`MAX_STDOUT_BYTES`] are kept.
//! - A command that cannot start, exits non-zero or times out yields no readings and a warning;
//!   a line that is not valid JSON in the schema is skipped with a warning naming the source and
//!   the line. Warnings are rate-limited per source. Nothing here panics.
//! - The command's stdin and stderr are `/dev/null`.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::config::agent::ExecSourceConfig;
use common::proto::AcceleratorSample;
use serde::Deserialize;

use super::{RateLimit, truncate_for_log};

/// Stdout kept from one run; the rest is read and dropped.
const MAX_STDOUT_BYTES: u64 = 1024 * 1024;

/// How long to wait for stdout to close after the child has exited or been killed. A grandchild
/// still holding the pipe past this is left behind, and its output ignored.
const STDOUT_GRACE: Duration = Duration::from_millis(200);

/// Longest pause between two `try_wait` polls.
const MAX_POLL: Duration = Duration::from_millis(20);

/// One line of the command's output.
///
/// Unknown fields are ignored, so the schema can grow without breaking older agents.
#[derive(Debug, Deserialize)]
struct Line {
    device: String,
    metrics: BTreeMap<String, f64>,
}

/// One `[[telemetry.exec]]` source.
pub(crate) struct ExecSource {
    /// `exec:NAME`.
    source: String,
    command: Vec<String>,
    timeout: Duration,
    /// Stdout buffer, handed to the reader thread and back to be reused.
    buf: Vec<u8>,
    /// Warnings about runs (start, exit status, timeout).
    run_warn: RateLimit,
    /// Warnings about invalid lines.
    line_warn: RateLimit,
}

/// How one run ended.
enum Outcome {
    Exited(ExitStatus),
    TimedOut,
    WaitFailed(std::io::Error),
}

impl ExecSource {
    /// A source for `cfg`; nothing runs until [`ExecSource::sample`].
    pub(crate) fn new(cfg: &ExecSourceConfig) -> Self {
        Self {
            source: format!("exec:{}", cfg.name),
            command: cfg.command.clone(),
            timeout: cfg.timeout,
            buf: Vec::new(),
            run_warn: RateLimit::new(RateLimit::DEFAULT_INTERVAL),
            line_warn: RateLimit::new(RateLimit::DEFAULT_INTERVAL),
        }
    }

    /// Runs the command once and appends one reading per valid output line to `out`.
    pub(crate) fn sample(&mut self, out: &mut Vec<AcceleratorSample>) {
        let Some(stdout) = self.run() else { return };
        let text = String::from_utf8_lossy(&stdout);
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match parse_line(line) {
                Ok(parsed) => out.push(AcceleratorSample {
                    source: self.source.clone(),
                    device: parsed.device,
                    metrics: parsed.metrics,
                }),
                Err(reason) => {
                    if let Some(suppressed) = self.line_warn.allow() {
                        tracing::warn!(
                            source = %self.source,
                            line = truncate_for_log(line, 200),
                            %reason,
                            suppressed,
                            "Skipped an invalid line of exec output."
                        );
                    }
                }
            }
        }
        self.buf = stdout;
    }

    /// Runs the command to completion or its timeout; `Some(stdout)` only on a zero exit.
    fn run(&mut self) -> Option<Vec<u8>> {
        let Some((program, args)) = self.command.split_first() else {
            self.warn_run("no command configured", None);
            return None;
        };
        let started = Instant::now();
        let mut child = match Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                self.warn_run("command could not start", Some(&e));
                return None;
            }
        };
        let output = child.stdout.take().map(|pipe| self.drain(pipe));
        let outcome = wait_with_deadline(&mut child, started + self.timeout);
        let stdout = output.and_then(|rx| rx.recv_timeout(STDOUT_GRACE).ok());
        match outcome {
            Outcome::Exited(status) if status.success() => {}
            Outcome::Exited(status) => {
                self.warn_run(&format!("command failed ({status})"), None);
                return None;
            }
            Outcome::TimedOut => {
                let msg =
                    format!("command timed out after {} ms; killed", self.timeout.as_millis());
                self.warn_run(&msg, None);
                return None;
            }
            Outcome::WaitFailed(e) => {
                self.warn_run("waiting for the command failed", Some(&e));
                return None;
            }
        }
        match stdout {
            Some((buf, truncated)) => {
                if truncated {
                    self.warn_run("output over 1 MiB; the rest was dropped", None);
                }
                Some(buf)
            }
            None => {
                self.warn_run("output did not close after the command exited", None);
                None
            }
        }
    }

    /// Reads the child's stdout on a helper thread into the reused buffer; the receiver gets the
    /// buffer back with whether output was cut at [`MAX_STDOUT_BYTES`].
    fn drain(&mut self, pipe: std::process::ChildStdout) -> mpsc::Receiver<(Vec<u8>, bool)> {
        let (tx, rx) = mpsc::sync_channel(1);
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let spawned = std::thread::Builder::new().name("exec-stdout".to_owned()).spawn(move || {
            let mut limited = pipe.take(MAX_STDOUT_BYTES);
            let _ = limited.read_to_end(&mut buf);
            let mut rest = limited.into_inner();
            let extra = std::io::copy(&mut rest, &mut std::io::sink()).unwrap_or(0);
            // The receiver may have given up waiting; then there is no one left to tell.
            let _ = tx.send((buf, extra > 0));
        });
        if let Err(e) = spawned {
            // Without a reader the child may block on a full pipe; the timeout still ends it.
            self.warn_run("could not start the output reader thread", Some(&e));
        }
        rx
    }

    fn warn_run(&mut self, what: &str, error: Option<&std::io::Error>) {
        if let Some(suppressed) = self.run_warn.allow() {
            tracing::warn!(
                source = %self.source,
                command = ?self.command,
                error = error.map(tracing::field::display),
                reason = what,
                suppressed,
                "Exec source produced no readings."
            );
        }
    }
}

/// Polls `child` until it exits or `deadline` passes, killing and reaping it in that case.
fn wait_with_deadline(child: &mut Child, deadline: Instant) -> Outcome {
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Outcome::Exited(status),
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Outcome::WaitFailed(e);
            }
        }
        let now = Instant::now();
        if now >= deadline {
            // kill fails only if the child has already exited; wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
            return Outcome::TimedOut;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// Parses one output line, saying why it was refused.
fn parse_line(line: &str) -> Result<Line, String> {
    let parsed: Line = serde_json::from_str(line).map_err(|e| e.to_string())?;
    if parsed.device.trim().is_empty() {
        return Err("empty device name".to_owned());
    }
    // Series are named accel.SOURCE.DEVICE.METRIC, so a '.' would make names ambiguous.
    let name_ok = |n: &str| n.chars().all(|c| c.is_ascii_alphanumeric() || "-_:".contains(c));
    if !name_ok(&parsed.device) {
        return Err(format!(
            "device name {:?} may hold only letters, digits, '-', '_' and ':'",
            parsed.device
        ));
    }
    if let Some(bad) = parsed.metrics.keys().find(|k| !name_ok(k)) {
        return Err(format!("metric name {bad:?} may hold only letters, digits, '-', '_' and ':'"));
    }
    if parsed.metrics.keys().any(String::is_empty) {
        return Err("empty metric name".to_owned());
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(command: &[&str], timeout: Duration) -> ExecSource {
        ExecSource::new(&ExecSourceConfig {
            name: "test".to_owned(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            timeout,
        })
    }

    fn sample(src: &mut ExecSource) -> Vec<AcceleratorSample> {
        let mut out = Vec::new();
        src.sample(&mut out);
        out
    }

    #[test]
    fn good_lines_become_readings_and_bad_lines_are_skipped() {
        let script = concat!(
            r#"printf '%s\n' '{"device": "card0", "metrics": {"temp_c": 55.0, "power_mw": 21000}}' "#,
            r#"'not json' "#,
            r#"'{"device": "card1", "metrics": {"temp_c": 61.5}}'"#,
        );
        let mut src = source(&["sh", "-c", script], Duration::from_secs(5));
        let out = sample(&mut src);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].source, "exec:test");
        assert_eq!(out[0].device, "card0");
        assert_eq!(out[0].metrics.get("temp_c"), Some(&55.0));
        assert_eq!(out[0].metrics.get("power_mw"), Some(&21000.0));
        assert_eq!(out[1].device, "card1");
        assert_eq!(out[1].metrics.get("temp_c"), Some(&61.5));
        // The buffer is reused on the next run.
        assert_eq!(sample(&mut src).len(), 2);
    }

    #[test]
    fn a_slow_command_is_killed_at_its_timeout() {
        let mut src = source(&["sleep", "5"], Duration::from_millis(200));
        let started = Instant::now();
        assert!(sample(&mut src).is_empty());
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    }

    #[test]
    fn a_missing_program_yields_nothing() {
        let mut src = source(&["/nonexistent/flotilla-exec-source"], Duration::from_secs(1));
        assert!(sample(&mut src).is_empty());
    }

    #[test]
    fn a_failing_command_yields_nothing() {
        let script = r#"printf '{"device":"card0","metrics":{"temp_c":1}}\n'; exit 3"#;
        let mut src = source(&["sh", "-c", script], Duration::from_secs(5));
        assert!(sample(&mut src).is_empty());
    }

    #[test]
    fn lines_outside_the_schema_are_refused() {
        assert!(parse_line(r#"{"device":"a","metrics":{"x_c":1}}"#).is_ok());
        assert!(parse_line(r#"{"device":"","metrics":{"x_c":1}}"#).is_err());
        assert!(parse_line(r#"{"device":"a","metrics":{"x_c":"hot"}}"#).is_err());
        assert!(parse_line(r#"{"device":"a"}"#).is_err());
        assert!(parse_line(r#"{"device":"a","metrics":{"":1}}"#).is_err());
        assert!(parse_line(r#"{"device":"a","metrics":{},"unit":"x"}"#).is_ok());
        assert!(parse_line("[1,2]").is_err());
        // Dots would make `accel.SOURCE.DEVICE.METRIC` ambiguous.
        let err = parse_line(r#"{"device":"card.0","metrics":{"x_c":1}}"#).unwrap_err();
        assert!(err.contains("card.0"), "{err}");
        assert!(parse_line(r#"{"device":"card0","metrics":{"die.temp_c":1}}"#).is_err());
        assert!(parse_line(r#"{"device":"pci:0000_3b","metrics":{"temp_c":1}}"#).is_ok());
    }

    proptest::proptest! {
        /// Any line, JSON-shaped or not, is parsed or refused with a reason; what is accepted
        /// has names that keep the series names unambiguous.
        #[test]
        fn any_output_line_is_parsed_or_refused(
            device in "[a-zA-Z0-9._: -]{0,12}",
            metrics in proptest::collection::vec(("[a-zA-Z0-9._:-]{0,10}", "-?[0-9]{1,20}(\\.[0-9]{0,5})?(e[+-]?[0-9]{1,3})?|\"x\"|null|\\[\\]"), 0..8),
            noise in ".{0,40}",
            cut in 0usize..200,
        ) {
            let body: Vec<String> = metrics.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
            let line = format!("{{\"device\":{device:?},\"metrics\":{{{}}}}}", body.join(","));
            for text in [line.clone(), format!("{line}{noise}"), line.chars().take(cut).collect()] {
                if let Ok(parsed) = parse_line(&text) {
                    let ok = |n: &str| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_:".contains(c));
                    proptest::prop_assert!(ok(&parsed.device), "{text}");
                    proptest::prop_assert!(parsed.metrics.keys().all(|k| ok(k)), "{text}");
                    proptest::prop_assert!(parsed.metrics.values().all(|v| v.is_finite()), "{text}");
                }
            }
        }
    }
}
