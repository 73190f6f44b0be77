//! The performance model (`vox2vec-train --bench-plan`): a step on the plan device records
//! every launch with its declared cost and every allocation through the caching allocator,
//! executing nothing. Runs on any machine (no GPU, no kernels needed).
//!
//! Plan mode is chosen once per process, so this file holds only plan tests.

use std::sync::Once;

use vox2vec::bench::plan_pretraining;
use vox2vec::model::{FpnConfig, ModelConfig};
use vox2vec::tensor::DType;
use vox2vec::train::BatchShape;

fn plan_mode() {
    static ON: Once = Once::new();
    ON.call_once(|| vox2vec::cuda::enable_plan_mode().expect("plan mode before any device"));
}

fn small_model() -> ModelConfig {
    ModelConfig { fpn: FpnConfig { in_channels: 1, base_channels: 8, num_scales: 4 }, proj_dim: 32, temperature: 0.1 }
}

#[test]
fn plan_counts_launches_and_memory_consistently() {
    plan_mode();
    let shape = BatchShape { pairs: 2, patch: [16, 16, 8], voxels_per_pair: 32 };
    for dtype in [DType::F32, DType::BF16] {
        let r = plan_pretraining(small_model(), dtype, shape, 0).unwrap();
        assert!(r.device.contains("plan"), "{}", r.device);
        let launches: u64 = r.costs.families.values().map(|f| f.launches).sum();
        assert_eq!(launches, r.costs.launches());
        assert!(launches > 100, "a whole step launches hundreds of kernels, got {launches}");
        for name in ["conv3d_forward", "conv3d_backward_input", "conv3d_backward_weight", "multi_adam"] {
            assert!(
                r.costs.families.contains_key(name),
                "{name} missing from {:?}",
                r.costs.families.keys().collect::<Vec<_>>()
            );
        }
        // The norm and Adam are multi-tensor: one launch each per step, whatever the parameter count.
        for name in ["multi_sumsq", "clip_finalize", "multi_adam"] {
            assert_eq!(r.costs.families[name].launches, 1, "{name}");
        }
        // The step holds at least the parameters, their gradients and Adam's two moments.
        let params: usize =
            vox2vec::model::Vox2Vec::new(small_model(), 0).store.slots().iter().map(|s| s.value.numel() * 4).sum();
        assert!(r.peak_in_use >= 3 * params, "peak {} < 3 x parameters {}", r.peak_in_use, params);
        assert!(r.peak_reserved >= r.peak_in_use && r.largest_allocation <= r.peak_in_use);
        assert!(r.floor_ms() > 0.0 && r.tensor_floor_ms() <= r.floor_ms() + 1e-12);
        let j = r.to_json();
        for key in
            ["peak_in_use_bytes", "peak_reserved_bytes", "largest_allocation_bytes", "floor_ms", "launches", "kernels"]
        {
            assert!(j.get(key).is_some(), "JSON lacks {key}");
        }
        let sum: f64 = j["kernels"].as_array().unwrap().iter().map(|k| k["floor_ms"].as_f64().unwrap()).sum();
        assert!((sum - r.floor_ms()).abs() < 1e-9 * r.floor_ms().max(1.0));
    }
}

#[test]
fn bf16_activations_halve_the_conv_traffic() {
    plan_mode();
    let shape = BatchShape { pairs: 2, patch: [32, 32, 16], voxels_per_pair: 32 };
    let f = plan_pretraining(small_model(), DType::F32, shape, 0).unwrap();
    let b = plan_pretraining(small_model(), DType::BF16, shape, 0).unwrap();
    let conv_bytes = |r: &vox2vec::bench::PlanReport| r.costs.families["conv3d_forward"].bytes;
    assert!(conv_bytes(&b) < 0.7 * conv_bytes(&f), "bf16 {} vs f32 {}", conv_bytes(&b), conv_bytes(&f));
    assert!(b.peak_in_use < f.peak_in_use);
}

#[test]
fn bench_plan_cli_writes_the_report() {
    let dir = std::env::temp_dir().join(format!("vox2vec-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("plan.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vox2vec-train"))
        .args(["--bench-plan", "--small", "--precision", "bf16", "--report"])
        .arg(&report)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kernel family") && text.contains("conv3d_forward"), "{text}");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(j["precision"], "bf16");
    assert!(j["peak_in_use_bytes"].as_u64().unwrap() > 0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn infonce_allocates_nothing_of_n_by_n_size() {
    plan_mode();
    // N = 4 x 1024 = 4096 pairs on small volumes: an N x N f32 matrix (64 MiB) would dwarf
    // every activation (a 16 x 16 x 8 level-0 map of 8 channels is 64 KiB per patch).
    let shape = BatchShape { pairs: 4, patch: [16, 16, 8], voxels_per_pair: 1024 };
    let r = plan_pretraining(small_model(), DType::BF16, shape, 0).unwrap();
    let n = shape.pairs * shape.voxels_per_pair;
    assert!(
        r.largest_allocation < n * n,
        "largest allocation {} B; N x N f32 is {} B",
        r.largest_allocation,
        n * n * 4
    );
}

/// The bf16 plan of a report written by `vox2vec-train --bench-plan` (base 16: every ResBlock
/// is fused), with VOX2VEC_NO_FUSION set or not.
fn bf16_plan_report(dir: &std::path::Path, no_fusion: bool) -> serde_json::Value {
    let report = dir.join(format!("plan-{no_fusion}.json"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vox2vec-train"))
        .args(["--bench-plan", "--small", "--precision", "bf16", "--report"])
        .arg(&report)
        .env("VOX2VEC_NO_FUSION", if no_fusion { "1" } else { "0" })
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
}

fn family(j: &serde_json::Value, name: &str, field: &str) -> f64 {
    j["kernels"].as_array().unwrap().iter().filter(|k| k["name"] == name).map(|k| k[field].as_f64().unwrap()).sum()
}

#[test]
fn fused_resblocks_move_fewer_bytes_and_store_no_activations() {
    let dir = std::env::temp_dir().join(format!("vox2vec-plan-fusion-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (fused, composed) = (bf16_plan_report(&dir, false), bf16_plan_report(&dir, true));
    std::fs::remove_dir_all(&dir).ok();
    let total = |j: &serde_json::Value, f: &str| {
        j["kernels"].as_array().unwrap().iter().map(|k| k[f].as_f64().unwrap()).sum::<f64>()
    };
    // The composed ResBlock writes relu(bn(x)) and relu(bn(h1)) in the forward and again in
    // the backward, and takes ReLU masks and BatchNorm sums in passes of their own.
    for name in ["bn_apply", "relu_backward"] {
        let (f, c) = (family(&fused, name, "launches"), family(&composed, name, "launches"));
        assert!(c > 0.0 && f < c / 4.0, "{name}: {f} launches fused, {c} composed");
    }
    // The decoder's merge adds the upsampled coarser level in the skip conv's epilogue
    // (ops::fpn_merge): no upsampled tensor is written in the forward.
    let (f, c) = (family(&fused, "upsample2_forward", "launches"), family(&composed, "upsample2_forward", "launches"));
    assert!(c > 0.0 && f == 0.0, "upsample2_forward: {f} launches fused, {c} composed");
    let (fb, cb) = (total(&fused, "bytes"), total(&composed, "bytes"));
    // (On --small the weights, Adam and the uploads weigh as much as the activations; on the
    // reference step the fused plan moves 35 % less.)
    assert!(fb < cb, "fused step moves {fb:.3e} B, composed {cb:.3e} B");
    // Peak: the fused block's per-brick partials (8 B per voxel and channel pair) may cost a
    // little where the peak is not in a ResBlock (--small); on the reference step it is 0.15
    // GiB lower fused.
    let (fp, cp) = (fused["peak_in_use_bytes"].as_f64().unwrap(), composed["peak_in_use_bytes"].as_f64().unwrap());
    assert!(fp <= 1.02 * cp, "peak {fp:.4e} B fused, {cp:.4e} B composed");
    // The FLOPs are the same convolutions.
    let (ff, cf) = (total(&fused, "flops"), total(&composed, "flops"));
    assert!((ff - cf).abs() <= 1e-9 * cf, "fused {ff:.6e} FLOPs, composed {cf:.6e}");
}

#[test]
fn out_of_memory_names_the_request_the_use_and_the_flags_to_lower() {
    // VOX2VEC_DEVICE_MEMORY_LIMIT makes the plan device as small as asked: the allocator's
    // out-of-memory path (the one a GPU's cuMemAlloc failure takes) runs without a GPU.
    let run = |limit: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vox2vec-train"))
            .args(["--bench-plan", "--small", "--precision", "bf16"])
            .env("VOX2VEC_DEVICE_MEMORY_LIMIT", limit)
            .output()
            .unwrap()
    };
    let out = run("64MiB");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a 64 MiB device ran the step:\n{err}");
    for want in [
        "CUDA out of memory",
        "MiB failed",
        "MiB in use",
        "--pairs",
        "--precision bf16",
        "--bench-plan",
        "LIMIT of 64.0 MiB",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    let out = run("8GiB");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run("lots");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("VOX2VEC_DEVICE_MEMORY_LIMIT=lots"));
}
