//! Any bytes as a weights file → `weights::read` (PyTorch zip / legacy / tar containers through
//! pytorch-reader, else safetensors), configuration inference, and `checkpoint::load_file` into
//! a tiny model (base 4, 3 scales: the size of tests/data/weights/fpn_tiny*, which
//! `dev/fuzz_seeds.rs` copies as seeds). Contract checked: no panic; a refused file changes
//! nothing; an accepted one leaves every value finite and every shape as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};
use vox2vec::weights::{Naming, read, resolve_backbone};

fuzz_target!(|data: &[u8]| {
    // pytorch-reader reads from a path: one scratch file per fuzzing process.
    let path = std::env::temp_dir().join(format!("vox2vec-fuzz-torch-{}.pt", std::process::id()));
    std::fs::write(&path, data).expect("writing the scratch file");
    let naming = if data.last().is_some_and(|b| b & 1 == 1) { Naming::Literal } else { Naming::Model };
    let Ok(file) = read(&path, naming) else { return };
    let _ = file.describe();
    let _ = file.infer_proj_dim();
    let _ = file.infer_head();
    let _ = resolve_backbone(&file, None, None);
    let _ = resolve_backbone(&file, Some(4), Some(3));
    let config = ModelConfig {
        fpn: FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 },
        proj_dim: 16,
        ..ModelConfig::default()
    };
    let mut model = Vox2Vec::new(config, 0);
    let before: Vec<Vec<u32>> = model
        .store
        .slots()
        .iter()
        .filter(|s| s.value.dtype() != vox2vec::tensor::DType::I64)
        .map(|s| s.value.f32s().iter().map(|v| v.to_bits()).collect())
        .collect();
    match vox2vec::checkpoint::load_file(file, &mut model.store, None) {
        Err(_) => {
            let after: Vec<Vec<u32>> = model
                .store
                .slots()
                .iter()
                .filter(|s| s.value.dtype() != vox2vec::tensor::DType::I64)
                .map(|s| s.value.f32s().iter().map(|v| v.to_bits()).collect())
                .collect();
            assert!(before == after, "a refused file modified the model");
        }
        Ok(_) => {
            for s in model.store.slots() {
                if s.value.dtype() != vox2vec::tensor::DType::I64 {
                    assert!(s.value.f32s().iter().all(|v| v.is_finite()), "{}: non-finite value accepted", s.name);
                }
            }
        }
    }
});
