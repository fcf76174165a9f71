//! Finding and loading the onnxruntime shared library, once per process, and the one
//! onnxruntime environment every session is built in.
//!
//! Nothing is downloaded at build time: the library is looked for at run time, in this order,
//! and the first that loads wins:
//! 1. the model config's `onnxruntime.library` (a file);
//! 2. `ORT_DYLIB_PATH` (a file);
//! 3. the library inside an installed `onnxruntime` wheel from PyPI
//!    (`site-packages/onnxruntime/capi/libonnxruntime.so.*`) under `$VIRTUAL_ENV`, `./.venv`,
//!    the user's and the system's Python directories.
//!
//! The environment holds the host's one onnxruntime thread pool (`cores` intra-op threads, not
//! spinning): every model that does not ask for a pool of its own runs its batches there, so
//! however many onnxruntime models and instances a host serves, onnxruntime never runs more
//! compute threads than the host has cores.
//!
//! A failure names every place looked at and why each failed, and is not remembered: the next
//! load of a model (after `pip install onnxruntime`, say) looks again. A success is for the life
//! of the process (onnxruntime cannot be unloaded); a later model that configures another path
//! gets the loaded one and a warning.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

/// The loaded library and its environment.
#[derive(Clone)]
pub struct OrtRuntime {
    /// The file it was loaded from.
    pub library: PathBuf,
    /// onnxruntime's own version string.
    pub version: String,
    /// The process-wide environment sessions are built in.
    pub environment: Arc<ort::environment::Environment>,
    /// Intra-op threads of the host's shared pool.
    pub host_pool_threads: usize,
}

impl std::fmt::Debug for OrtRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtRuntime")
            .field("library", &self.library)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

static LOADED: Mutex<Option<OrtRuntime>> = Mutex::new(None);

/// The loaded runtime, loading it first if no model has yet. `configured` is the model config's
/// `onnxruntime.library`.
pub fn runtime(configured: Option<&Path>) -> Result<OrtRuntime, String> {
    let mut loaded = LOADED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(rt) = loaded.as_ref() {
        if let Some(path) = configured
            && path != rt.library
        {
            warn!(
                configured = %path.display(),
                loaded = %rt.library.display(),
                "onnxruntime is already loaded from another file; one process holds one library, so this model uses the loaded one."
            );
        }
        return Ok(rt.clone());
    }
    let mut looked = Vec::new();
    for candidate in candidates(configured, &mut looked) {
        match load(&candidate) {
            Ok(rt) => {
                info!(library = %rt.library.display(), version = %rt.version, "onnxruntime loaded.");
                *loaded = Some(rt.clone());
                return Ok(rt);
            }
            Err(e) => looked.push(format!("{}: {e}", candidate.display())),
        }
    }
    Err(format!(
        "the onnxruntime shared library was not found or did not load; looked at: {}. Install it \
         with `pip install onnxruntime` (into ./.venv or the active virtualenv), or set \
         ORT_DYLIB_PATH or the model config's onnxruntime.library to a libonnxruntime.so \
         (version 1.22 or newer)",
        looked.join("; ")
    ))
}

/// The library file if one is loaded (for reports).
pub fn loaded() -> Option<OrtRuntime> {
    LOADED.lock().ok().and_then(|l| l.clone())
}

fn load(path: &Path) -> Result<OrtRuntime, String> {
    // onnxruntime (C++) throws on some malformed files rather than returning; nothing here
    // unwinds into Rust, but a panic inside the crate must not take the loader thread down.
    let outcome = std::panic::catch_unwind(|| -> Result<OrtRuntime, String> {
        let builder = ort::init_from(path).map_err(|e| e.to_string())?;
        let host_pool_threads = super::threads::host_cores();
        let pool = ort::environment::GlobalThreadPoolOptions::default()
            .with_intra_threads(host_pool_threads)
            .and_then(|p| p.with_inter_threads(1))
            .and_then(|p| p.with_spin_control(false))
            .map_err(|e| format!("setting up the host thread pool: {e}"))?;
        let environment = builder
            .with_name("flotilla-agent")
            .with_telemetry(false)
            .with_global_thread_pool(pool)
            .build()
            .map_err(|e| format!("creating the environment: {e}"))?;
        Ok(OrtRuntime {
            library: path.to_path_buf(),
            version: version_of(path, ort::info()),
            environment: Arc::new(environment),
            host_pool_threads,
        })
    });
    outcome.unwrap_or_else(|_| Err("loading it panicked".to_owned()))
}

/// The release: from the file name (`libonnxruntime.so.1.32.0`), else from onnxruntime's build
/// string (`... git-branch=rel-1.32.0, ...`), else the whole build string.
fn version_of(path: &Path, build: &str) -> String {
    let from_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split_once(".so."))
        .map(|(_, v)| v.to_owned())
        .filter(|v| v.split('.').all(|p| p.parse::<u32>().is_ok()));
    from_name
        .or_else(|| {
            build
                .split(['=', ',', ' '])
                .find_map(|part| part.strip_prefix("rel-"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| build.to_owned())
}

/// The files to try, in order; places that hold nothing are noted in `looked`.
fn candidates(configured: Option<&Path>, looked: &mut Vec<String>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    match configured {
        Some(path) => out.push(path.to_path_buf()),
        None => looked.push("onnxruntime.library (not set in the model config)".to_owned()),
    }
    match std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        Some(path) => out.push(PathBuf::from(path)),
        None => looked.push("ORT_DYLIB_PATH (not set)".to_owned()),
    }
    for root in python_roots() {
        let found = wheel_libraries(&root);
        if found.is_empty() {
            looked.push(format!("{} (no onnxruntime wheel)", root.display()));
        }
        out.extend(found);
    }
    out
}

/// Directories that may hold `lib/python3.*/site-packages` (or are themselves such a directory).
fn python_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
        roots.push(PathBuf::from(venv));
    }
    roots.push(PathBuf::from(".venv"));
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        roots.push(PathBuf::from(home).join(".local"));
    }
    roots.push(PathBuf::from("/usr/local"));
    roots.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    roots
}

/// `libonnxruntime.so*` files of an `onnxruntime` (or `onnxruntime-gpu`) wheel under `root`.
fn wheel_libraries(root: &Path) -> Vec<PathBuf> {
    let mut packages = vec![root.to_path_buf()];
    for lib in ["lib", "lib64"] {
        let Ok(entries) = std::fs::read_dir(root.join(lib)) else { continue };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pythons.sort();
        for python in pythons.into_iter().rev() {
            packages.push(python.join("site-packages"));
            packages.push(python.join("dist-packages"));
        }
    }
    let mut out = Vec::new();
    for packages in packages {
        let capi = packages.join("onnxruntime").join("capi");
        let Ok(entries) = std::fs::read_dir(&capi) else { continue };
        let mut libs: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("libonnxruntime.so") || name == "libonnxruntime.dylib"
            })
            .map(|e| e.path())
            .collect();
        libs.sort();
        out.extend(libs);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The onnxruntime wheel's libraries under a virtualenv (for other modules' tests).
    pub(crate) fn wheel_libraries_under(venv: &Path) -> Vec<PathBuf> {
        wheel_libraries(venv)
    }

    #[test]
    fn the_release_is_read_from_the_build_string() {
        let wheel = Path::new("/venv/onnxruntime/capi/libonnxruntime.so.1.32.0");
        assert_eq!(version_of(wheel, "ORT Build Info: git-branch=HEAD"), "1.32.0");
        let plain = Path::new("/opt/libonnxruntime.so");
        let build = "ORT Build Info: git-branch=rel-1.22.0, git-commit-id=abc, build type=Release";
        assert_eq!(version_of(plain, build), "1.22.0");
        assert_eq!(version_of(plain, "custom build"), "custom build");
    }

    #[test]
    fn a_wheel_layout_is_found_under_a_virtualenv() {
        let dir = tempfile::tempdir().expect("tempdir");
        let capi = dir.path().join("lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).expect("mkdir");
        std::fs::write(capi.join("libonnxruntime.so.1.32.0"), b"").expect("write");
        std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").expect("write");
        let found = wheel_libraries(dir.path());
        assert_eq!(found, vec![capi.join("libonnxruntime.so.1.32.0")]);
    }
}
