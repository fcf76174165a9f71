//! onnxruntime models share the host's one thread pool: loading more of them starts no more
//! compute threads, where a model with a pool of its own does.
//!
//! Its own test binary (one process, one test) so that the thread count it reads from
//! `/proc/self/task` moves only with what this test does.

use std::path::{Path, PathBuf};

use agent::serving::model_config::{ModelConfig, OrtOptions};
use agent::serving::onnxruntime::OrtEngine;
use agent::serving::runner::Engine;
use agent::serving::tensor::{DataType, Tensor};
use agent::serving::threads::{OrtThreads, host_cores};

fn threads_now() -> usize {
    std::fs::read_dir("/proc/self/task").map(Iterator::count).unwrap_or(0)
}

/// onnxruntime from the wheel `scripts/test` installs into the checkout's `.venv`.
fn options() -> OrtOptions {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv");
    let library = glob_library(&venv).unwrap_or_else(|| {
        panic!("no onnxruntime wheel in {}: run scripts/test, which installs it", venv.display())
    });
    OrtOptions { library: Some(library), ..OrtOptions::default() }
}

fn glob_library(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    for python in std::fs::read_dir(lib).ok()?.flatten() {
        let capi = python.path().join("site-packages/onnxruntime/capi");
        for entry in std::fs::read_dir(capi).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with("libonnxruntime.so") {
                return Some(entry.path());
            }
        }
    }
    None
}

fn tokens() -> Tensor {
    Tensor::from_bytes(DataType::I32, vec![1, 512], vec![1; 4 * 512]).expect("tokens")
}

#[test]
fn models_in_the_host_pool_start_no_threads_and_a_model_with_its_own_pool_does() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/text_cnn.onnx");
    let config = ModelConfig::default();
    let load = |threads| {
        let (engine, _) = OrtEngine::load(&file, &config, &options(), threads).expect("loads");
        engine.run(vec![tokens()]).expect("runs");
        engine
    };
    // The first load creates the environment and with it the host pool.
    let first = load(OrtThreads::HostPool);
    let before = threads_now();
    let more: Vec<_> = (0..3).map(|_| load(OrtThreads::HostPool)).collect();
    let after = threads_now();
    assert_eq!(
        after,
        before,
        "three more models in the host pool started {} threads",
        after.saturating_sub(before)
    );
    let cores = host_cores();
    if cores < 2 {
        eprintln!("1 core: a pool of its own would start no thread either; nothing more to see");
        return;
    }
    // The control: a pool of its own with `cores` threads starts `cores - 1` (the caller runs
    // the rest), so the count above would have seen per-model pools.
    let own = load(OrtThreads::Own(cores));
    assert_eq!(threads_now(), after + cores - 1, "a pool of its own starts its threads");
    drop((first, more, own));
}
