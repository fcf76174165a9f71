//! The demo model `flotilla up` serves, so a newcomer can call the inference API at once: a
//! 4-feature, 3-class linear softmax classifier (made by `scripts/make-demo-model.py`), embedded
//! in the binary.

use std::path::Path;

/// The model file.
pub const DEMO_ONNX: &[u8] = include_bytes!("../../assets/demo.onnx");

/// The model's name in the repository.
pub const DEMO_NAME: &str = "demo";

const DEMO_CONFIG: &str = "# Written by `flotilla up`: the demo classifier. See docs/serving.md for every key.\n\
max_batch_size = 8\nmax_queue_delay_us = 500\n";

/// Writes `repo/demo/1/model.onnx` and `repo/demo/config.toml` unless `repo/demo` exists (an
/// operator's edits are kept).
pub fn install_demo(repo: &Path) -> std::io::Result<()> {
    let dir = repo.join(DEMO_NAME);
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir.join("1"))?;
    std::fs::write(dir.join("1").join("model.onnx"), DEMO_ONNX)?;
    std::fs::write(dir.join("config.toml"), DEMO_CONFIG)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::model_config::ModelConfig;
    use crate::serving::runner::{Engine, TractEngine};
    use crate::serving::tensor::{DataType, Tensor};

    #[test]
    fn demo_installs_loads_and_classifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        install_demo(dir.path()).expect("install");
        let model_dir = dir.path().join(DEMO_NAME);
        let config = ModelConfig::load(&model_dir, DEMO_NAME).expect("config");
        let (engine, signature) =
            TractEngine::load(&model_dir.join("1/model.onnx"), &config).expect("loads");
        assert_eq!(signature.max_batch_size, 8);
        let x: Vec<u8> = [5.1f32, 3.5, 1.4, 0.2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let out = engine
            .run(vec![Tensor::from_bytes(DataType::F32, vec![1, 4], x).expect("x")])
            .expect("runs");
        let p = out[0].to_f64();
        assert_eq!(p.len(), 3);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{p:?}");
        // Installing again keeps what is there.
        std::fs::write(model_dir.join("config.toml"), "max_batch_size = 2\n").expect("edit");
        install_demo(dir.path()).expect("again");
        assert_eq!(
            std::fs::read_to_string(model_dir.join("config.toml")).expect("read"),
            "max_batch_size = 2\n"
        );
    }
}
