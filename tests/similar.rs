//! `vox2vec similar`: on a CT and copies of it that are stored differently (file axis 0
//! flipped with the affine flipped too: the same world; air slabs added in front of axis 1
//! with the affine unchanged: the anatomy moved in the world), the best match of each query
//! point is its known image, within one voxel, in file indices and in world millimetres.

mod common;

use std::path::Path;
use std::process::Command;

use common::write_ct_with_affine as write_ct;
use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-similar-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn matches(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("matches.json")).unwrap()).unwrap()
}

fn xyz(v: &serde_json::Value) -> [f64; 3] {
    [v[0].as_f64().unwrap(), v[1].as_f64().unwrap(), v[2].as_f64().unwrap()]
}

#[test]
fn best_matches_in_flipped_and_shifted_copies_are_the_known_images() {
    let dir = tmpdir("copies");
    let shape = [48usize, 40, 16];
    let spacing = [2.0, 2.0, 2.0];
    let hu = vox2vec::data::phantom::phantom_ct(11, shape, spacing);
    let a = [[2.0, 0.0, 0.0, -40.0], [0.0, 2.0, 0.0, 12.0], [0.0, 0.0, 2.0, 100.0], [0.0, 0.0, 0.0, 1.0]];
    write_ct(&dir.join("a.nii.gz"), &hu, shape, a);
    // The same world, file axis 0 stored backwards: file index x' = 47 - x.
    let mut flipped = a;
    flipped[0] = [-2.0, 0.0, 0.0, -40.0 + 2.0 * 47.0];
    write_ct(&dir.join("flipped.nii.gz"), &hu, shape, flipped);
    // 7 slabs of air in front of axis 1, affine unchanged: file index y' = y + 7, world y + 14 mm.
    let pad = 7;
    let padded_shape = [shape[0], shape[1] + pad, shape[2]];
    let mut padded = vec![-1000i16; padded_shape.iter().product()];
    for x in 0..shape[0] {
        for y in 0..shape[1] {
            for z in 0..shape[2] {
                padded[(x * padded_shape[1] + y + pad) * padded_shape[2] + z] = hu[(x * shape[1] + y) * shape[2] + z];
            }
        }
    }
    write_ct(&dir.join("padded.nii.gz"), &padded, padded_shape, a);
    let cfg = ModelConfig {
        fpn: FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 },
        proj_dim: 8,
        temperature: 0.1,
    };
    let m = Vox2Vec::new(cfg, 21);
    let w = dir.join("w.safetensors");
    vox2vec::checkpoint::save(&w, &m.config, &m.store, None, &[]).unwrap();
    // Points inside the phantom's body, away from its centre and edges.
    for (k, p) in [[20usize, 14, 8], [30, 25, 5], [14, 22, 11], [26, 10, 9]].iter().enumerate() {
        let out = dir.join(format!("out{k}"));
        let res = Command::new(env!("CARGO_BIN_EXE_vox2vec"))
            .arg("similar")
            .arg("--weights")
            .arg(&w)
            .arg("--query")
            .arg(dir.join("a.nii.gz"))
            .args(["--point", &format!("{},{},{}", p[0], p[1], p[2])])
            .arg("--target")
            .args([dir.join("a.nii.gz"), dir.join("flipped.nii.gz"), dir.join("padded.nii.gz")])
            .arg("--out")
            .arg(&out)
            .args(["--spacing", "2,2,2", "--patch", "16,16,8", "--device", "cpu"])
            .output()
            .unwrap();
        assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
        let j = matches(&out);
        let q_world = xyz(&j["query_world_mm"]);
        let want_file = [[p[0], p[1], p[2]], [47 - p[0], p[1], p[2]], [p[0], p[1] + pad, p[2]]];
        let want_world = [q_world, q_world, [q_world[0], q_world[1] + 2.0 * pad as f64, q_world[2]]];
        for (t, m) in j["matches"].as_array().unwrap().iter().enumerate() {
            let (got, world) = (xyz(&m["best_voxel"]), xyz(&m["best_world_mm"]));
            for a in 0..3 {
                assert!(
                    (got[a] - want_file[t][a] as f64).abs() <= 1.0,
                    "point {p:?}, target {t}: voxel {got:?}, expected {:?}",
                    want_file[t]
                );
                assert!(
                    (world[a] - want_world[t][a]).abs() <= 2.0 + 1e-6,
                    "point {p:?}, target {t}: world {world:?}, expected {:?}",
                    want_world[t]
                );
            }
            assert!(m["similarity"].as_f64().unwrap() > 0.999, "{m}");
        }
        for f in ["a_similarity.nii.gz", "flipped_match.png", "padded_similarity.nii.gz"] {
            assert!(out.join(f).is_file(), "{f}");
        }
    }
    // A point outside the embedded box is a clear error that leaves no output.
    let out = dir.join("outside");
    let res = Command::new(env!("CARGO_BIN_EXE_vox2vec"))
        .args(["similar", "--point", "500,0,0", "--spacing", "2,2,2", "--patch", "16,16,8"])
        .arg("--weights")
        .arg(&w)
        .arg("--query")
        .arg(dir.join("a.nii.gz"))
        .arg("--target")
        .arg(dir.join("a.nii.gz"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("outside") && err.contains("a.nii.gz"), "{err}");
    assert!(!out.exists());
}
