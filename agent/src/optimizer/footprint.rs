//! A candidate's memory, measured alone: a child process (`flotilla-agent footprint`) loads
//! the candidate, runs every calibration request and one batch of the largest size, and reports
//! its peak resident set (`VmHWM`) against its resident set before the load. In one process the
//! candidates would share an allocator, and a later one would read low by reusing what an
//! earlier one freed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::calibration;
use super::search::{EngineChoice, load_engine};
use crate::serving::model_config::{ModelConfig, OrtGraphLevel, TractPrecision};
use crate::serving::threads::OrtThreads;

/// Longest a child may take; past it, it is killed and the candidate's memory is not measured.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// What the child reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    /// Resident set before the candidate loaded, bytes.
    pub before_bytes: u64,
    /// Peak resident set after loading and running it, bytes.
    pub peak_bytes: u64,
}

impl Footprint {
    /// What the candidate added at its peak.
    pub fn added_bytes(&self) -> u64 {
        self.peak_bytes.saturating_sub(self.before_bytes)
    }
}

/// How the child is told which engine to use: `tract` (with `@f16` for half precision and
/// `@symbolic` for one plan for every batch size), `onnxruntime` (the host's pool) or
/// `onnxruntime:THREADS`, with `@LEVEL` after an onnxruntime one whose graph optimization is
/// not `all`.
pub fn engine_arg(engine: EngineChoice) -> String {
    match engine {
        EngineChoice::Tract(precision, symbolic_batch) => {
            let mut arg = "tract".to_owned();
            if precision != TractPrecision::F32 {
                arg.push('@');
                arg.push_str(precision.name());
            }
            if symbolic_batch {
                arg.push_str("@symbolic");
            }
            arg
        }
        EngineChoice::Onnxruntime(threads, level) => {
            let mut arg = match threads {
                OrtThreads::HostPool => "onnxruntime".to_owned(),
                OrtThreads::Own(n) => format!("onnxruntime:{n}"),
            };
            if level != OrtGraphLevel::All {
                arg.push('@');
                arg.push_str(level.name());
            }
            arg
        }
    }
}

/// The inverse of [`engine_arg`].
pub fn parse_engine(text: &str) -> Result<EngineChoice, String> {
    let bad = || {
        format!(
            "--engine {text:?}: must be tract (optionally followed by @f16 and @symbolic), or onnxruntime or onnxruntime:THREADS (optionally followed by @disabled, @basic or @extended)"
        )
    };
    let mut parts = text.split('@');
    let engine = parts.next().unwrap_or_default();
    let options: Vec<&str> = parts.collect();
    if engine == "tract" {
        let (mut precision, mut symbolic) = (TractPrecision::F32, false);
        for option in options {
            match option {
                "symbolic" if !symbolic => symbolic = true,
                other => precision = TractPrecision::parse(other).ok_or_else(bad)?,
            }
        }
        return Ok(EngineChoice::Tract(precision, symbolic));
    }
    let level = match options.as_slice() {
        [] => OrtGraphLevel::All,
        [level] => OrtGraphLevel::parse(level).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    let threads = match engine {
        "onnxruntime" => OrtThreads::HostPool,
        other => other
            .strip_prefix("onnxruntime:")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n >= 1)
            .map(OrtThreads::Own)
            .ok_or_else(bad)?,
    };
    Ok(EngineChoice::Onnxruntime(threads, level))
}

/// Runs in the child: loads `file` on `engine`, runs the calibration requests of `model_dir`
/// and one batch of `max_batch` rows, and measures.
pub fn measure_here(
    file: &Path,
    engine: EngineChoice,
    config: &ModelConfig,
    model_dir: &Path,
    calibration_rows: usize,
) -> Result<Footprint, String> {
    let before = status_bytes("VmRSS")?;
    let (engine, signature) = load_engine(file, engine, config)?;
    let calibration = calibration::load(model_dir, &signature, calibration_rows)?;
    for (r, request) in calibration.requests.iter().enumerate() {
        engine.run(request.clone()).map_err(|e| format!("calibration request {r}: {e}"))?;
    }
    let rows = config.max_batch_size.min(signature.max_batch_size);
    if rows > 1 {
        let batch = super::search::batch_of(&calibration, rows, true)?;
        engine.run(batch).map_err(|e| format!("a batch of {rows}: {e}"))?;
    }
    Ok(Footprint { before_bytes: before, peak_bytes: status_bytes("VmHWM")? })
}

/// Runs `probe` (the agent binary) as the child and reads its report. The child runs at the
/// lowest CPU priority (`nice -n 19`, where `nice` is installed), so it yields to serving.
pub fn measure_in_child(
    probe: &Path,
    file: &Path,
    engine: EngineChoice,
    config: &ModelConfig,
    calibration_rows: usize,
) -> Result<Footprint, String> {
    let mut command = match which_nice() {
        Some(nice) => {
            let mut c = Command::new(nice);
            c.arg("-n").arg("19").arg(probe);
            c
        }
        None => Command::new(probe),
    };
    // Quiet, so its pipes never fill while it runs (they are read after it exits).
    command
        .arg("--log")
        .arg("warn")
        .arg("footprint")
        .arg("--file")
        .arg(file)
        .arg("--engine")
        .arg(engine_arg(engine))
        .arg("--max-batch")
        .arg(config.max_batch_size.to_string())
        .arg("--calibration-rows")
        .arg(calibration_rows.to_string());
    if let Some(library) = &config.onnxruntime.library {
        command.arg("--ort-library").arg(library);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", probe.display()))?;
    let deadline = Instant::now() + CHILD_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the footprint child ran past {} s and was killed",
                    CHILD_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for the footprint child: {e}")),
        }
    }
    // It has exited: its pipes hold at most what it wrote, and reading them cannot block.
    let out = child.wait_with_output().map_err(|e| format!("reading the footprint child: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the footprint child failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("the footprint child's report is not JSON: {e}"))
}

/// `nice` from coreutils, if it is on one of the usual paths.
fn which_nice() -> Option<PathBuf> {
    ["/usr/bin/nice", "/bin/nice"].into_iter().map(PathBuf::from).find(|p| p.is_file())
}

/// A `Vm*` line of `/proc/self/status`, in bytes.
fn status_bytes(key: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status: {e}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("/proc/self/status has no {key}"))
}

/// This process, when it is the agent binary (only it has the `footprint` subcommand).
pub fn agent_probe() -> Option<PathBuf> {
    std::env::current_exe().ok().filter(|exe| {
        exe.file_name().is_some_and(|n| n.to_string_lossy().starts_with("flotilla-agent"))
    })
}

/// The model directory of a version's file (`NAME/1/model.onnx` -> `NAME`).
pub fn model_dir_of(file: &Path) -> PathBuf {
    file.parent().and_then(Path::parent).unwrap_or(Path::new(".")).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_round_trip_through_their_argument_and_bad_ones_are_named() {
        for e in [
            EngineChoice::Tract(TractPrecision::F32, false),
            EngineChoice::Tract(TractPrecision::F16, false),
            EngineChoice::Tract(TractPrecision::F32, true),
            EngineChoice::Tract(TractPrecision::F16, true),
            EngineChoice::Onnxruntime(OrtThreads::HostPool, OrtGraphLevel::All),
            EngineChoice::Onnxruntime(OrtThreads::Own(3), OrtGraphLevel::All),
            EngineChoice::Onnxruntime(OrtThreads::HostPool, OrtGraphLevel::Basic),
            EngineChoice::Onnxruntime(OrtThreads::Own(1), OrtGraphLevel::Disabled),
        ] {
            assert_eq!(parse_engine(&engine_arg(e)), Ok(e));
        }
        assert_eq!(
            engine_arg(EngineChoice::Onnxruntime(OrtThreads::Own(2), OrtGraphLevel::Extended)),
            "onnxruntime:2@extended"
        );
        assert!(parse_engine("onnxruntime:0").unwrap_err().contains("onnxruntime:THREADS"));
        assert!(parse_engine("onnxruntime@max").unwrap_err().contains("@basic"));
        assert!(parse_engine("tract@basic").is_err());
        assert_eq!(engine_arg(EngineChoice::Tract(TractPrecision::F16, false)), "tract@f16");
        assert_eq!(engine_arg(EngineChoice::Tract(TractPrecision::F32, true)), "tract@symbolic");
        assert!(parse_engine("tract@symbolic@symbolic").is_err());
        assert!(parse_engine("onnxruntime@basic@basic").is_err());
        assert!(parse_engine("tvm").is_err());
        assert!(status_bytes("VmRSS").is_ok_and(|b| b > 0));
    }
}
