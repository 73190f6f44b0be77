//! safetensors bytes → `checkpoint::load_bytes` into a tiny vox2vec model (base 2, 2 scales,
//! projection 4; `dev/fuzz_seeds.rs` writes its checkpoints as seeds), with Adam, both
//! key conventions. Contract checked: a refused file changes nothing (parameters, buffers,
//! moments, step); an accepted one leaves every value finite and every shape as it was.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};
use vox2vec::optim::{Adam, AdamConfig};
use vox2vec::params::ParamStore;

fn snapshot(
    store: &ParamStore,
    adam: &Adam,
) -> (Vec<(Vec<usize>, Vec<u64>)>, Vec<Option<Vec<f32>>>, Vec<Option<Vec<f32>>>, u64) {
    let values = store
        .slots()
        .iter()
        .map(|s| {
            let bits = match s.value.dtype() {
                vox2vec::tensor::DType::I64 => s.value.i64s().iter().map(|&v| v as u64).collect(),
                _ => s.value.f32s().iter().map(|v| v.to_bits() as u64).collect(),
            };
            (s.value.shape().to_vec(), bits)
        })
        .collect();
    (values, adam.exp_avg.clone(), adam.exp_avg_sq.clone(), adam.step)
}

fuzz_target!(|data: &[u8]| {
    let config = ModelConfig {
        fpn: FpnConfig { in_channels: 1, base_channels: 2, num_scales: 2 },
        proj_dim: 4,
        ..ModelConfig::default()
    };
    let mut model = Vox2Vec::new(config, 0);
    let mut adam = Adam::new(AdamConfig::default(), &model.store);
    // The first byte picks the key convention: checkpoints (bare keys = backbone) or heads.
    let bare_keys_are_backbone = data.first().is_none_or(|b| b & 1 == 0);
    let before = snapshot(&model.store, &adam);
    let r = vox2vec::checkpoint::load_bytes(
        Path::new("fuzz.safetensors"),
        data,
        &mut model.store,
        Some(&mut adam),
        bare_keys_are_backbone,
    );
    let after = snapshot(&model.store, &adam);
    match r {
        Err(_) => assert!(before == after, "a refused checkpoint modified the model or the optimiser"),
        Ok(_) => {
            for (b, a) in before.0.iter().zip(&after.0) {
                assert_eq!(b.0, a.0, "a loaded checkpoint changed a parameter's shape");
            }
            for s in model.store.slots() {
                if s.value.dtype() != vox2vec::tensor::DType::I64 {
                    assert!(s.value.f32s().iter().all(|v| v.is_finite()), "{}: non-finite value accepted", s.name);
                }
            }
            for (m, s) in adam.exp_avg.iter().zip(&before.1) {
                assert_eq!(m.as_ref().map(Vec::len), s.as_ref().map(Vec::len), "a moment changed size");
            }
        }
    }
});
