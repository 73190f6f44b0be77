//! `vox2vec embed`: the raw pyramid of a preprocessed .npy patch equals the reference's eval
//! pyramid (fixtures); whole-volume embedding stitches each window's own features.

mod common;

use common::{Fixture, fixture_files, rel_err};
use safetensors::tensor::{Dtype, TensorView};
use vox2vec::eval::embed::{Blend, embed_volume, patch_pyramid};
use vox2vec::eval::npy;
use vox2vec::eval::sliding::Plan;
use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-embed-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn npy_patch_gives_the_reference_eval_pyramid() {
    let dir = tmpdir("npy");
    for path in fixture_files() {
        let f = Fixture::load(&path);
        let cfg = f.config();
        // Bare FPN3d state_dict, as converted from PyTorch.
        let owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = f
            .keys_with_prefix("param.backbone.")
            .iter()
            .map(|k| {
                let (shape, val) = &f.tensors[k];
                let (d, b) = match val {
                    common::Value::F32(v) => (Dtype::F32, bytemuck::cast_slice(v).to_vec()),
                    common::Value::I64(v) => (Dtype::I64, bytemuck::cast_slice(v).to_vec()),
                };
                (k["param.backbone.".len()..].to_string(), d, shape.clone(), b)
            })
            .collect();
        let views: Vec<_> = owned.iter().map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        let weights = dir.join(format!("w_{}", f.name));
        std::fs::write(&weights, safetensors::serialize(views, None).unwrap()).unwrap();
        // Patch 0 of x1, [X, Y, Z].
        let (s, x) = f.f32("input.x1");
        let sp = s[2] * s[3] * s[4];
        let patch = dir.join(format!("x_{}.npy", f.name));
        npy::write_f32(&patch, &[s[2], s[3], s[4]], &x[..sp]).unwrap();
        let out = dir.join(format!("out_{}", f.name));
        let res = std::process::Command::new(env!("CARGO_BIN_EXE_vox2vec"))
            .arg("embed")
            .arg(&patch)
            .arg("--weights")
            .arg(&weights)
            .arg("--out")
            .arg(&out)
            .args(["--base-channels", &cfg.fpn.base_channels.to_string(), "--num-scales", &cfg.fpn.num_scales.to_string()])
            .output()
            .unwrap();
        assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
        for i in 0..cfg.fpn.num_scales {
            let (shape, ours) = npy::read_f32(&out.join(format!("pyramid_{i}.npy"))).unwrap();
            let (es, expect) = f.f32(&format!("expect.eval.pyramid.{i}"));
            assert_eq!(shape, es[1..].to_vec());
            let n: usize = es[1..].iter().product();
            let e = rel_err(&ours, &expect[..n], 0.0);
            println!("embed {} level {i}: rel err {e:.2e}", f.name);
            assert!(e < 1e-4, "{} level {i}: {e}", f.name);
        }
    }
}

#[test]
fn whole_volume_embedding_stitches_window_features() {
    let cfg = ModelConfig { fpn: FpnConfig { in_channels: 1, base_channels: 2, num_scales: 3 }, proj_dim: 4, temperature: 0.1 };
    let mut m = Vox2Vec::new(cfg, 4);
    let patch = [8usize, 8, 4];
    // One window exactly: the stitched map is the window's pyramid.
    let x1: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
    let maps = embed_volume(&mut m, &x1, patch, patch, &[0, 1], Blend::Central, 1, &|_, _| {}).unwrap();
    let gauss = embed_volume(&mut m, &x1, patch, patch, &[0, 1], Blend::Gaussian, 1, &|_, _| {}).unwrap();
    for (a, b) in maps.iter().zip(&gauss) {
        assert!(rel_err(&b.values, &a.values, 0.0) < 1e-6, "one window: Gaussian blending must return the window itself");
    }
    let direct = patch_pyramid(&mut m, &x1, patch).unwrap();
    for (map, level) in maps.iter().zip([0usize, 1]) {
        let (ds, dv) = &direct[level];
        let ours = vox2vec::tensor::nxyzc_to_ncxyz(&map.values, 1, map.channels, map.shape.iter().product());
        assert_eq!(vec![map.channels, map.shape[0], map.shape[1], map.shape[2]], *ds);
        assert!(rel_err(&ours, dv, 0.0) < 1e-6);
    }
    // A larger volume (and one smaller than the patch along z, padded): every voxel of level 0
    // equals its owning window's feature there.
    let shape = [13usize, 11, 3];
    let x: Vec<f32> = (0..shape.iter().product::<usize>()).map(|i| ((i * 53) % 97) as f32 / 96.0).collect();
    let maps = embed_volume(&mut m, &x, shape, patch, &[0], Blend::Central, 1, &|_, _| {}).unwrap();
    let gauss = embed_volume(&mut m, &x, shape, patch, &[0], Blend::Gaussian, 1, &|_, _| {}).unwrap();
    let c0 = maps[0].channels;
    // The corner voxel is seen by one window only: both combinations agree there; elsewhere they differ.
    assert!((0..c0).all(|ch| (gauss[0].values[ch] - maps[0].values[ch]).abs() < 1e-5));
    assert!(rel_err(&gauss[0].values, &maps[0].values, 0.0) > 1e-4);
    assert_eq!(maps[0].shape, shape);
    let padded_shape = [13, 11, 4];
    let mut padded = vec![0.0f32; 13 * 11 * 4];
    for i in 0..13 {
        for j in 0..11 {
            for k in 0..3 {
                padded[(i * 11 + j) * 4 + k] = x[(i * 11 + j) * 3 + k];
            }
        }
    }
    let plan = Plan::new(padded_shape, patch);
    let c = maps[0].channels;
    for (which, start) in plan.boxes() {
        let mut px = Vec::new();
        for i in start[0]..start[0] + 8 {
            for j in start[1]..start[1] + 8 {
                px.extend_from_slice(&padded[(i * 11 + j) * 4 + start[2]..(i * 11 + j) * 4 + start[2] + 4]);
            }
        }
        let pyr = patch_pyramid(&mut m, &px, patch).unwrap();
        let (_, level0) = &pyr[0]; // [C, 8, 8, 4]
        for gx in 0..13 {
            for gy in 0..11 {
                for gz in 0..3 {
                    if plan.axes[0].owner[gx] == which[0] && plan.axes[1].owner[gy] == which[1] && plan.axes[2].owner[gz] == which[2] {
                        for ch in 0..c {
                            let want = level0[((ch * 8 + gx - start[0]) * 8 + gy - start[1]) * 4 + gz - start[2]];
                            let got = maps[0].values[((gx * 11 + gy) * 3 + gz) * c + ch];
                            assert!((want - got).abs() < 1e-6, "voxel ({gx}, {gy}, {gz}) channel {ch}");
                        }
                    }
                }
            }
        }
    }
}
