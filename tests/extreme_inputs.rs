//! The writers and queries added after the readers were fuzzed, on inputs at the edges: the
//! NIfTI feature writer and `--original-grid` on a permuted, flipped, far-translated affine and
//! on a spacing too fine to resample; `similar`'s query point off the image and in the air;
//! `predict` on a CT with no body, or a body of one voxel. Each either gives exact, finite results or is refused with
//! the file named and nothing left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::write_ct_with_affine;
use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-extreme-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn vox2vec(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vox2vec")).args(args).output().unwrap()
}

fn small_weights(dir: &Path) -> PathBuf {
    let cfg = ModelConfig { fpn: FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 }, ..Default::default() };
    let m = Vox2Vec::new(cfg, 3);
    let w = dir.join("w.safetensors");
    vox2vec::checkpoint::save(&w, &m.config, &m.store, None, &[]).unwrap();
    w
}

fn srows(path: &Path) -> [[f64; 4]; 3] {
    use nifti::NiftiObject;
    let h = nifti::ReaderOptions::new().read_file(path).unwrap().header().clone();
    [h.srow_x, h.srow_y, h.srow_z].map(|r| r.map(f64::from))
}

fn mul(a: &[[f64; 4]; 4], v: [f64; 3]) -> [f64; 3] {
    std::array::from_fn(|r| a[r][0] * v[0] + a[r][1] * v[1] + a[r][2] * v[2] + a[r][3])
}

#[test]
fn features_on_a_permuted_flipped_far_away_grid_keep_the_inputs_world() {
    let dir = tmpdir("affine");
    let shape = [24usize, 20, 12];
    let hu = vox2vec::data::phantom::phantom_ct(5, shape, [2.0, 2.0, 2.0]);
    // File axis 0 runs along world -y, axis 1 along world x, axis 2 along z; a kilometre away.
    let affine = [[0.0, 2.0, 0.0, 1.0e6], [-2.0, 0.0, 0.0, -1.0e6], [0.0, 0.0, 2.0, 5.0e5], [0.0, 0.0, 0.0, 1.0]];
    let ct = dir.join("far.nii.gz");
    write_ct_with_affine(&ct, &hu, shape, affine);
    let w = small_weights(&dir);
    let out = dir.join("out");
    let args = ["--format", "npy,nifti", "--levels", "0,1", "--original-grid", "--spacing", "2,2,2"];
    let res = vox2vec(
        &[
            &["embed".as_ref(), ct.as_os_str(), "--weights".as_ref(), w.as_os_str(), "--out".as_ref(), out.as_os_str()]
                [..],
            &args.map(|a| a.as_ref()),
            &["--patch", "16,16,8", "--device", "cpu"].map(|a| a.as_ref()),
        ]
        .concat(),
    );
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    // On the input's own grid: the input's affine, exactly as the file stores it (f32).
    let input = srows(&ct);
    for l in [0, 1] {
        assert_eq!(srows(&out.join(format!("level_{l}_original.nii.gz"))), input, "level {l} on the original grid");
        let (s, v) = vox2vec::eval::npy::read_f32(&out.join(format!("level_{l}_original.npy"))).unwrap();
        assert_eq!(&s[1..], &vox2vec::data::nifti_io::read_volume(&ct).unwrap().geometry.file_shape[..]);
        assert!(v.iter().all(|x| x.is_finite()), "level {l} on the original grid: a non-finite value");
    }
    // On the preprocessed grid: the level affine geometry.json records, and its voxels inside
    // the input's world box.
    let geo: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("geometry.json")).unwrap()).unwrap();
    let (lo, hi) = {
        let corners: Vec<[f64; 3]> = (0..8)
            .map(|c| {
                let fs = [shape[1], shape[0], shape[2]];
                let v = [0, 1, 2].map(|a| if c >> a & 1 == 1 { fs[a] as f64 - 1.0 } else { 0.0 });
                mul(&affine, v)
            })
            .collect();
        let lo: [f64; 3] = std::array::from_fn(|a| corners.iter().map(|p| p[a]).fold(f64::INFINITY, f64::min));
        let hi: [f64; 3] = std::array::from_fn(|a| corners.iter().map(|p| p[a]).fold(f64::NEG_INFINITY, f64::max));
        (lo, hi)
    };
    for l in ["0", "1"] {
        let a: [[f64; 4]; 4] = serde_json::from_value(geo["level_affines"][l].clone()).unwrap();
        let stored = srows(&out.join(format!("level_{l}.nii.gz")));
        for r in 0..3 {
            for c in 0..4 {
                assert!(
                    (stored[r][c] - a[r][c]).abs() <= 1e-7 * a[r][c].abs().max(1.0),
                    "level {l} srow {r}: {stored:?} vs {a:?}"
                );
            }
        }
        let (s, _) = vox2vec::eval::npy::read_f32(&out.join(format!("level_{l}.npy"))).unwrap();
        let last = [s[1] - 1, s[2] - 1, s[3] - 1].map(|v| v as f64);
        for p in [mul(&a, [0.0; 3]), mul(&a, last)] {
            for ax in 0..3 {
                assert!(
                    p[ax] >= lo[ax] - 4.0 && p[ax] <= hi[ax] + 4.0,
                    "level {l}: voxel at {p:?} outside {lo:?}..{hi:?}"
                );
            }
        }
    }
}

#[test]
fn a_spacing_too_fine_to_resample_is_refused_and_leaves_nothing() {
    let dir = tmpdir("fine");
    let shape = [40usize, 40, 20];
    let hu = vox2vec::data::phantom::phantom_ct(6, shape, [1.0, 1.0, 1.0]);
    let a = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]];
    let ct = dir.join("ct.nii.gz");
    write_ct_with_affine(&ct, &hu, shape, a);
    let w = small_weights(&dir);
    let out = dir.join("out");
    let res = vox2vec(&[
        "embed".as_ref(),
        ct.as_os_str(),
        "--weights".as_ref(),
        w.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--spacing".as_ref(),
        "0.001,0.001,0.001".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "a 40,000 × 40,000 × 20,000 grid was accepted");
    assert!(err.contains("ct.nii.gz") && !err.contains("panicked"), "{err}");
    assert!(!out.exists(), "embed left {} behind", out.display());
}

fn similar(dir: &Path, ct: &Path, w: &Path, point: &str, extra: &[&str]) -> Output {
    let out = dir.join("similar");
    let res = Command::new(env!("CARGO_BIN_EXE_vox2vec"))
        .arg("similar")
        .arg("--weights")
        .arg(w)
        .arg("--query")
        .arg(ct)
        .args(["--point", point])
        .args(extra)
        .arg("--target")
        .arg(ct)
        .arg("--out")
        .arg(&out)
        .args(["--spacing", "2,2,2", "--patch", "16,16,8", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(res.status.success() || !out.exists(), "similar left {} behind after failing", out.display());
    res
}

#[test]
fn similar_refuses_query_points_off_the_image_or_in_the_air() {
    let dir = tmpdir("similar");
    // A phantom torso with 6 slabs of air on each side along file axis 0.
    let (shape, pad) = ([36usize, 32, 16], 6);
    let body = vox2vec::data::phantom::phantom_ct(8, shape, [2.0, 2.0, 2.0]);
    let padded_shape = [shape[0] + 2 * pad, shape[1], shape[2]];
    let mut hu = vec![-1000i16; padded_shape.iter().product()];
    for x in 0..shape[0] {
        let (src, dst) = (x * shape[1] * shape[2], (x + pad) * shape[1] * shape[2]);
        hu[dst..dst + shape[1] * shape[2]].copy_from_slice(&body[src..src + shape[1] * shape[2]]);
    }
    let a = [[2.0, 0.0, 0.0, -10.0], [0.0, 2.0, 0.0, 20.0], [0.0, 0.0, 2.0, 30.0], [0.0, 0.0, 0.0, 1.0]];
    let ct = dir.join("ct.nii.gz");
    write_ct_with_affine(&ct, &hu, padded_shape, a);
    let w = small_weights(&dir);
    let fail = |point: &str, extra: &[&str], want: &str| {
        let res = similar(&dir, &ct, &w, point, extra);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "--point {point} {extra:?} was accepted");
        assert!(err.contains("ct.nii.gz") && err.contains(want) && !err.contains("panicked"), "{point}: {err}");
    };
    fail("48,16,8", &[], "outside the image, whose voxels are 0..48 x 0..32 x 0..16");
    fail("-1,16,8", &[], "outside the image");
    fail("10000,10000,10000", &["--world"], "outside the image");
    let res = similar(&dir, &ct, &w, "nan,1,2", &[]);
    assert!(!res.status.success() && String::from_utf8_lossy(&res.stderr).contains("expected X,Y,Z numbers"));
    // Inside the image but beside the body, outside what is embedded.
    fail("1,1,1", &[], "body's bounding box");
    // Inside the body's bounding box, in the air around the torso: a corner of the box.
    let idx = |x: usize, y: usize, z: usize| (x * padded_shape[1] + y) * padded_shape[2] + z;
    let inside = |v: &i16| *v >= -500;
    let xs: Vec<usize> = (0..padded_shape[0])
        .filter(|&x| (0..padded_shape[1]).any(|y| (0..16).any(|z| inside(&hu[idx(x, y, z)]))))
        .collect();
    let ys: Vec<usize> = (0..padded_shape[1])
        .filter(|&y| (0..padded_shape[0]).any(|x| (0..16).any(|z| inside(&hu[idx(x, y, z)]))))
        .collect();
    let (x0, y0) = (xs[0], ys[0]);
    assert!(hu[idx(x0, y0, 8)] < -900, "the phantom fills its bounding box's corner");
    fail(&format!("{x0},{y0},8"), &[], "in the air outside the body");
    // A point inside the body still works.
    let res = similar(&dir, &ct, &w, &format!("{},16,8", pad + shape[0] / 2), &[]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
}

#[test]
fn predict_refuses_a_ct_without_a_body_and_keeps_labels_in_the_body() {
    let dir = tmpdir("nobody");
    let shape = [24usize, 24, 12];
    let a = [[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]];
    // All air; and air with one voxel above -500 HU.
    let air = dir.join("air.nii.gz");
    write_ct_with_affine(&air, &vec![-1000i16; shape.iter().product()], shape, a);
    let mut speck = vec![-1000i16; shape.iter().product()];
    speck[(12 * shape[1] + 12) * shape[2] + 6] = -400;
    let speck_ct = dir.join("speck.nii.gz");
    write_ct_with_affine(&speck_ct, &speck, shape, a);
    let w = small_weights(&dir);
    // A linear head of 2 classes for this backbone (what probe writes, minus training).
    let cfg = vox2vec::model::FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 };
    let mut hs = vox2vec::params::ParamStore::new();
    let _ = vox2vec::eval::segment::Head::new(vox2vec::eval::segment::HeadKind::Linear, &mut hs, 0, cfg, 2);
    let head = dir.join("head.safetensors");
    let mc = ModelConfig { fpn: cfg, ..Default::default() };
    let meta = [("head_kind", "linear".to_string()), ("num_classes", "2".to_string())];
    vox2vec::checkpoint::save(&head, &mc, &hs, None, &meta).unwrap();
    let predict = |ct: &Path, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_vox2vec"))
            .arg("predict")
            .arg(ct)
            .arg("--backbone")
            .arg(&w)
            .arg("--head")
            .arg(&head)
            .arg("--out")
            .arg(out)
            .args(["--spacing", "4,4,4", "--patch", "16,16,8", "--device", "cpu"])
            .output()
            .unwrap()
    };
    let out = dir.join("air_mask.nii.gz");
    let res = predict(&air, &out);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "a CT without a body was segmented");
    assert!(err.contains("air.nii.gz") && err.contains("no body") && !err.contains("panicked"), "{err}");
    assert!(!out.exists(), "predict wrote {} for a CT without a body", out.display());
    // A body of one voxel is a body: segmented, with labels nowhere but there (probabilities
    // outside the body mask are 0).
    let out = dir.join("speck_mask.nii.gz");
    let res = predict(&speck_ct, &out);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let mask = vox2vec::data::nifti_io::read_volume(&out).unwrap();
    assert_eq!(mask.shape, shape);
    let labelled: Vec<usize> = mask.data.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(i, _)| i).collect();
    assert!(labelled.iter().all(|&i| i == (12 * shape[1] + 12) * shape[2] + 6), "labels in the air: {labelled:?}");
}
