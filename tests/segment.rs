//! Segmentation end to end through the binary: `vox2vec probe` on a small nnU-Net dataset made
//! here (writes results.json and the best head), then `vox2vec predict` on a CT with permuted and
//! flipped axes: the mask has the input's exact shape and affine, and lands on the structure.

use std::path::{Path, PathBuf};
use std::process::Command;

use nifti::{NiftiObject, ReaderOptions};
use vox2vec::data::nifti_io::read_volume;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-seg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A CT with a bright "bone" block (label 1) inside a soft-tissue body, stored with the file
/// axes (z reversed, x, y reversed) as in tests/nifti.rs. `shift` moves the block.
fn write_case(image: &Path, label: &Path, shift: usize) {
    let (cx, cy, cz) = (40usize, 36usize, 24usize); // canonical extent, 1 × 1 × 2 mm
    let file_shape = [cz, cx, cy];
    let mut img = ndarray::ArrayD::<i16>::zeros(ndarray::IxDyn(&file_shape));
    let mut lab = ndarray::ArrayD::<u8>::zeros(ndarray::IxDyn(&file_shape));
    for a in 0..cz {
        for b in 0..cx {
            for c in 0..cy {
                let (x, y, z) = (b, cy - 1 - c, cz - 1 - a);
                let body = (4..36).contains(&x) && (4..32).contains(&y) && (2..22).contains(&z);
                let bone = (10 + shift..18 + shift).contains(&x) && (12..20).contains(&y) && (6..14).contains(&z);
                img[[a, b, c]] = if bone { 900 } else if body { 40 } else { -1000 };
                lab[[a, b, c]] = bone as u8;
            }
        }
    }
    let h = nifti::NiftiHeader {
        sform_code: 1,
        srow_x: [0.0, 1.0, 0.0, -10.0],
        srow_y: [0.0, 0.0, -1.0, 20.0],
        srow_z: [-2.0, 0.0, 0.0, 30.0],
        pixdim: [1.0, 2.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
        ..nifti::NiftiHeader::default()
    };
    nifti::writer::WriterOptions::new(image).reference_header(&h).write_nifti_with_type(&img, nifti::NiftiType::Int16).unwrap();
    nifti::writer::WriterOptions::new(label).reference_header(&h).write_nifti_with_type(&lab, nifti::NiftiType::Uint8).unwrap();
}

/// An nnU-Net raw dataset of four block CTs (c0..c3).
fn blocks_dataset(d: &Path) -> PathBuf {
    let ds = d.join("Dataset900_Blocks");
    std::fs::create_dir_all(ds.join("imagesTr")).unwrap();
    std::fs::create_dir_all(ds.join("labelsTr")).unwrap();
    std::fs::write(ds.join("dataset.json"), r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "Bone": 1}, "numTraining": 4, "file_ending": ".nii.gz"}"#).unwrap();
    for (i, shift) in [0usize, 3, 6, 9].iter().enumerate() {
        write_case(&ds.join(format!("imagesTr/c{i}_0000.nii.gz")), &ds.join(format!("labelsTr/c{i}.nii.gz")), *shift);
    }
    ds
}

#[test]
fn online_probe_is_logged_with_the_loss() {
    let d = tmpdir("online");
    let ds = blocks_dataset(&d);
    let out = d.join("run");
    let res = Command::new(env!("CARGO_BIN_EXE_vox2vec-train"))
        .args(["--synthetic-pairs", "--base-channels", "4", "--num-scales", "3", "--proj-dim", "16", "--pairs", "2", "--patch", "16,16,8", "--voxels", "16", "--steps", "4"])
        .arg("--out")
        .arg(&out)
        .arg("--probe-dataset")
        .arg(&ds)
        .args(["--probe-every", "2", "--probe-steps", "300", "--probe-patch", "16,16,8", "--probe-lr", "3e-2", "--probe-spacing", "1,1,2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.contains("online linear probe"), "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let probes: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|v| v.get("probe_mean_dice").is_some()).collect();
    assert_eq!(probes.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 4]);
    for p in &probes {
        let dice = p["probe_mean_dice"].as_f64().unwrap();
        println!("online probe at step {}: Dice {dice:.3}", p["step"]);
        assert!((0.0..=1.0).contains(&dice));
    }
}

#[test]
fn probe_then_predict_on_permuted_flipped_ct() {
    let d = tmpdir("probe");
    let ds = blocks_dataset(&d);
    let out = d.join("probe");
    let bin = env!("CARGO_BIN_EXE_vox2vec");
    let res = Command::new(bin)
        .arg("probe")
        .arg(&ds)
        .arg("--out")
        .arg(&out)
        .args(["--base-channels", "4", "--num-scales", "3", "--patch", "16,16,8", "--batch", "4", "--steps", "400", "--validate-every", "200", "--lr", "3e-2", "--val", "c1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&res.stdout).to_string() + &String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{text}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let dice = r["best_dice"][0].as_f64().unwrap();
    println!("probe on blocks: best Dice {dice:.3}\n{text}");
    assert!(dice > 0.5, "a linear probe should find a bright block: Dice {dice}");

    // A random backbone (seed 0) saved as a checkpoint, and the head just trained on it.
    let backbone = d.join("backbone.safetensors");
    let m = vox2vec::model::Vox2Vec::new(vox2vec::model::ModelConfig { fpn: vox2vec::model::FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 }, ..Default::default() }, 0);
    vox2vec::checkpoint::save(&backbone, &m.config, &m.store, None, &[]).unwrap();
    // A head file's tensors are the head's, not a backbone's.
    let res = Command::new(bin).arg("inspect").arg(out.join("head.safetensors")).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("head:") && !text.contains("backbone:"), "{text}");
    let mask = d.join("mask.nii.gz");
    let ct = ds.join("imagesTr/c1_0000.nii.gz");
    let res = Command::new(bin).arg("predict").arg(&ct).arg("--backbone").arg(&backbone).arg("--head").arg(out.join("head.safetensors")).arg("--out").arg(&mask).arg("--probabilities").arg(d.join("probs")).args(["--patch", "16,16,8"]).output().unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let a = ReaderOptions::new().read_file(&ct).unwrap();
    let b = ReaderOptions::new().read_file(&mask).unwrap();
    assert_eq!(a.header().dim, b.header().dim, "mask grid differs from the CT's");
    assert_eq!((a.header().srow_x, a.header().srow_y, a.header().srow_z), (b.header().srow_x, b.header().srow_y, b.header().srow_z));
    // The predicted mask overlaps the true block on the input's own grid.
    let pred = read_volume(&mask).unwrap();
    let truth = read_volume(&ds.join("labelsTr/c1.nii.gz")).unwrap();
    let p: Vec<bool> = pred.data.iter().map(|&v| v > 0.5).collect();
    let t: Vec<bool> = truth.data.iter().map(|&v| v > 0.5).collect();
    let dice = vox2vec::eval::dice::dice(&p, &t);
    println!("predict on the original grid: Dice {dice:.3}");
    assert!(dice > 0.5, "predicted mask misplaced: Dice {dice}");
    // The probability map is on the same grid and agrees with the mask.
    let prob = read_volume(&d.join("probs/Bone.nii.gz")).unwrap();
    assert_eq!(prob.shape, pred.shape);
    assert!(prob.data.iter().zip(&p).all(|(&q, &m)| (q > 0.5) == m), "probabilities disagree with the mask");
}

#[test]
fn finetune_and_scratch_train_the_backbone_too() {
    let d = tmpdir("finetune");
    let ds = blocks_dataset(&d);
    let bin = env!("CARGO_BIN_EXE_vox2vec");
    let weights = d.join("w.safetensors");
    let m = vox2vec::model::Vox2Vec::new(vox2vec::model::ModelConfig { fpn: vox2vec::model::FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 }, ..Default::default() }, 3);
    vox2vec::checkpoint::save(&weights, &m.config, &m.store, None, &[]).unwrap();
    let common = ["--patch", "16,16,8", "--batch", "2", "--steps", "6", "--validate-every", "3", "--lr", "1e-2", "--val", "c2"];
    let ft = d.join("ft");
    let res = Command::new(bin).arg("finetune").arg(&ds).arg("--weights").arg(&weights).arg("--out").arg(&ft).args(common).args(["--unfreeze-after", "3"]).output().unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let sc = d.join("scratch");
    let res = Command::new(bin).arg("scratch").arg(&ds).arg("--out").arg(&sc).args(["--base-channels", "4", "--num-scales", "3"]).args(common).output().unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    for dir in [&ft, &sc] {
        assert!(dir.join("results.json").is_file() && dir.join("head.safetensors").is_file());
        assert!(dir.join("backbone.safetensors").is_file(), "{}: the trained backbone is kept", dir.display());
    }
    // Fine-tuning changed the backbone once unfrozen (best checkpoint may be from step 3 or 6).
    let mut after = vox2vec::model::Vox2Vec::new(m.config, 99);
    vox2vec::checkpoint::load(&ft.join("backbone.safetensors"), &mut after.store, None).unwrap();
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ft.join("results.json")).unwrap()).unwrap();
    let slot = m.store.find("backbone.first_conv.weight").unwrap();
    let changed = m.store.get(slot).f32s() != after.store.get(slot).f32s();
    assert_eq!(changed, r["best_step"].as_u64().unwrap() > 3, "backbone frozen for 3 steps, trained after");
    // Without weights, finetune is refused.
    let res = Command::new(bin).arg("finetune").arg(&ds).arg("--out").arg(d.join("x")).args(common).output().unwrap();
    assert!(!res.status.success());
}

#[test]
fn embed_ct_writes_levels_and_original_grid_maps() {
    let d = tmpdir("embedct");
    let ds = blocks_dataset(&d);
    let ct = ds.join("imagesTr/c0_0000.nii.gz");
    let weights = d.join("w.safetensors");
    let m = vox2vec::model::Vox2Vec::new(vox2vec::model::ModelConfig { fpn: vox2vec::model::FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 }, ..Default::default() }, 3);
    vox2vec::checkpoint::save(&weights, &m.config, &m.store, None, &[]).unwrap();
    let out = d.join("feats");
    let res = Command::new(env!("CARGO_BIN_EXE_vox2vec"))
        .arg("embed")
        .arg(&ct)
        .arg("--weights")
        .arg(&weights)
        .arg("--out")
        .arg(&out)
        .args(["--levels", "0,1", "--patch", "16,16,8", "--gaussian", "--original-grid", "--f16"])
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    // A run that fails after creating its output folder removes it again; a missing input is
    // named before the weights are read.
    let failed = d.join("feats-failed");
    let res = Command::new(env!("CARGO_BIN_EXE_vox2vec")).arg("embed").arg(&ct).arg("--weights").arg(&weights).arg("--out").arg(&failed).args(["--patch", "16,16,8", "--levels", "7"]).output().unwrap();
    assert!(!res.status.success() && !failed.exists(), "{}", String::from_utf8_lossy(&res.stderr));
    let res = Command::new(env!("CARGO_BIN_EXE_vox2vec")).arg("embed").arg(d.join("nope.nii.gz")).arg("--weights").arg(d.join("no-weights.safetensors")).arg("--out").arg(&failed).output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("nope.nii.gz: no such file") && !failed.exists(), "{err}");
    let geo: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("geometry.json")).unwrap()).unwrap();
    let shape: Vec<usize> = serde_json::from_value(geo["shape"].clone()).unwrap();
    let header = |name: &str| {
        let b = std::fs::read(out.join(name)).unwrap();
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        (String::from_utf8_lossy(&b[10..10 + hlen]).to_string(), b.len() - 10 - hlen)
    };
    let (h0, n0) = header("level_0.npy");
    assert!(h0.contains("'<f2'") && h0.contains(&format!("(4, {}, {}, {})", shape[0], shape[1], shape[2])), "{h0}");
    assert_eq!(n0, 2 * 4 * shape.iter().product::<usize>());
    let (h1, _) = header("level_1.npy");
    assert!(h1.contains(&format!("(8, {}, {}, {})", shape[0].div_ceil(2), shape[1].div_ceil(2), shape[2].div_ceil(2))), "{h1}");
    // On the file's own grid: the file stores (z, x, y) with 24 × 40 × 36 voxels.
    let (ho, no) = header("level_0_original.npy");
    assert!(ho.contains("(4, 24, 40, 36)"), "{ho}");
    assert_eq!(no, 2 * 4 * 24 * 40 * 36);
}
