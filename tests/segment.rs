//! Segmentation end to end through the binary: `vox2vec probe` on a small nnU-Net dataset made
//! here (writes results.json and the best head), then `vox2vec predict` on a CT with permuted and
//! flipped axes: the mask has the input's exact shape and affine, and lands on the structure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::blocks::blocks_dataset;

use nifti::{NiftiObject, ReaderOptions};
use vox2vec::data::nifti_io::read_volume;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-seg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn online_probe_is_logged_with_the_loss() {
    let d = tmpdir("online");
    let ds = blocks_dataset(&d);
    let out = d.join("run");
    let res = Command::new(env!("CARGO_BIN_EXE_vox2vec-train"))
        .args([
            "--synthetic-pairs",
            "--base-channels",
            "4",
            "--num-scales",
            "3",
            "--proj-dim",
            "16",
            "--pairs",
            "2",
            "--patch",
            "16,16,8",
            "--voxels",
            "16",
            "--steps",
            "4",
        ])
        .arg("--out")
        .arg(&out)
        .arg("--probe-dataset")
        .arg(&ds)
        .args([
            "--probe-every",
            "2",
            "--probe-steps",
            "300",
            "--probe-patch",
            "16,16,8",
            "--probe-lr",
            "3e-2",
            "--probe-spacing",
            "1,1,2",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.contains("online linear probe"), "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let probes: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("probe_mean_dice").is_some())
        .collect();
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
        .args([
            "--base-channels",
            "4",
            "--num-scales",
            "3",
            "--patch",
            "16,16,8",
            "--batch",
            "4",
            "--steps",
            "400",
            "--validate-every",
            "200",
            "--lr",
            "3e-2",
            "--val",
            "c1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&res.stdout).to_string() + &String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{text}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let dice = r["best_dice"][0].as_f64().unwrap();
    println!("probe on blocks: best Dice {dice:.3}\n{text}");
    assert!(dice > 0.5, "a linear probe should find a bright block: Dice {dice}");

    // A random backbone (seed 0) saved as a checkpoint, and the head just trained on it.
    let backbone = d.join("backbone.safetensors");
    let m = vox2vec::model::Vox2Vec::new(
        vox2vec::model::ModelConfig {
            fpn: vox2vec::model::FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 },
            ..Default::default()
        },
        0,
    );
    vox2vec::checkpoint::save(&backbone, &m.config, &m.store, None, &[]).unwrap();
    // A head file's tensors are the head's, not a backbone's.
    let res = Command::new(bin).arg("inspect").arg(out.join("head.safetensors")).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("head:") && !text.contains("backbone:"), "{text}");
    let mask = d.join("mask.nii.gz");
    let ct = ds.join("imagesTr/c1_0000.nii.gz");
    let res = Command::new(bin)
        .arg("predict")
        .arg(&ct)
        .arg("--backbone")
        .arg(&backbone)
        .arg("--head")
        .arg(out.join("head.safetensors"))
        .arg("--out")
        .arg(&mask)
        .arg("--probabilities")
        .arg(d.join("probs"))
        .args(["--patch", "16,16,8"])
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let a = ReaderOptions::new().read_file(&ct).unwrap();
    let b = ReaderOptions::new().read_file(&mask).unwrap();
    assert_eq!(a.header().dim, b.header().dim, "mask grid differs from the CT's");
    assert_eq!(
        (a.header().srow_x, a.header().srow_y, a.header().srow_z),
        (b.header().srow_x, b.header().srow_y, b.header().srow_z)
    );
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

    // The whole dataset in one run (its imagesTr; the next CT read while one is segmented):
    // one mask per CT in the --out folder, c1's identical to the single-file run's, and
    // --sw-batch 3 changes nothing.
    let masks = d.join("masks");
    let res = Command::new(bin)
        .arg("predict")
        .arg(&ds)
        .arg("--backbone")
        .arg(&backbone)
        .arg("--head")
        .arg(out.join("head.safetensors"))
        .arg("--out")
        .arg(&masks)
        .arg("--probabilities")
        .arg(d.join("probs-all"))
        .args(["--patch", "16,16,8", "--sw-batch", "3"])
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    for c in 0..4 {
        assert!(
            masks.join(format!("c{c}_0000.nii.gz")).is_file()
                && d.join(format!("probs-all/c{c}_0000/Bone.nii.gz")).is_file(),
            "c{c}: no mask or probabilities"
        );
    }
    assert_eq!(
        read_volume(&masks.join("c1_0000.nii.gz")).unwrap().data,
        pred.data,
        "c1's mask from the folder run differs from the single-file run's"
    );
    // A folder's masks need a folder: a NIfTI name as --out is refused.
    let res = Command::new(bin)
        .arg("predict")
        .arg(&ds)
        .arg("--backbone")
        .arg(&backbone)
        .arg("--head")
        .arg(out.join("head.safetensors"))
        .arg("--out")
        .arg(d.join("one.nii.gz"))
        .args(["--patch", "16,16,8"])
        .output()
        .unwrap();
    assert!(!res.status.success() && String::from_utf8_lossy(&res.stderr).contains("must be a folder"));
}

#[test]
fn finetune_and_scratch_train_the_backbone_too() {
    let d = tmpdir("finetune");
    let ds = blocks_dataset(&d);
    let bin = env!("CARGO_BIN_EXE_vox2vec");
    let weights = d.join("w.safetensors");
    let m = vox2vec::model::Vox2Vec::new(
        vox2vec::model::ModelConfig {
            fpn: vox2vec::model::FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 },
            ..Default::default()
        },
        3,
    );
    vox2vec::checkpoint::save(&weights, &m.config, &m.store, None, &[]).unwrap();
    let common =
        ["--patch", "16,16,8", "--batch", "2", "--steps", "6", "--validate-every", "3", "--lr", "1e-2", "--val", "c2"];
    let ft = d.join("ft");
    let res = Command::new(bin)
        .arg("finetune")
        .arg(&ds)
        .arg("--weights")
        .arg(&weights)
        .arg("--out")
        .arg(&ft)
        .args(common)
        .args(["--unfreeze-after", "3"])
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let sc = d.join("scratch");
    let res = Command::new(bin)
        .arg("scratch")
        .arg(&ds)
        .arg("--out")
        .arg(&sc)
        .args(["--base-channels", "4", "--num-scales", "3"])
        .args(common)
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    for dir in [&ft, &sc] {
        assert!(dir.join("results.json").is_file() && dir.join("head.safetensors").is_file());
        assert!(dir.join("backbone.safetensors").is_file(), "{}: the trained backbone is kept", dir.display());
    }
    // Fine-tuning changed the backbone once unfrozen (best checkpoint may be from step 3 or 6).
    let mut after = vox2vec::model::Vox2Vec::new(m.config, 99);
    vox2vec::checkpoint::load(&ft.join("backbone.safetensors"), &mut after.store, None).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ft.join("results.json")).unwrap()).unwrap();
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
    let m = vox2vec::model::Vox2Vec::new(
        vox2vec::model::ModelConfig {
            fpn: vox2vec::model::FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 },
            ..Default::default()
        },
        3,
    );
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
    let res = Command::new(env!("CARGO_BIN_EXE_vox2vec"))
        .arg("embed")
        .arg(&ct)
        .arg("--weights")
        .arg(&weights)
        .arg("--out")
        .arg(&failed)
        .args(["--patch", "16,16,8", "--levels", "7"])
        .output()
        .unwrap();
    assert!(!res.status.success() && !failed.exists(), "{}", String::from_utf8_lossy(&res.stderr));
    let res = Command::new(env!("CARGO_BIN_EXE_vox2vec"))
        .arg("embed")
        .arg(d.join("nope.nii.gz"))
        .arg("--weights")
        .arg(d.join("no-weights.safetensors"))
        .arg("--out")
        .arg(&failed)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("nope.nii.gz: no such file") && !failed.exists(), "{err}");
    let geo: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("geometry.json")).unwrap()).unwrap();
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
    assert!(
        h1.contains(&format!("(8, {}, {}, {})", shape[0].div_ceil(2), shape[1].div_ceil(2), shape[2].div_ceil(2))),
        "{h1}"
    );
    // On the file's own grid: the file stores (z, x, y) with 24 × 40 × 36 voxels.
    let (ho, no) = header("level_0_original.npy");
    assert!(ho.contains("(4, 24, 40, 36)"), "{ho}");
    assert_eq!(no, 2 * 4 * 24 * 40 * 36);

    // A folder of CTs: each into <out>/<name>/, c0's files byte-identical to the single run's.
    let embed_folder = |input: &Path, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_vox2vec"))
            .arg("embed")
            .arg(input)
            .arg("--weights")
            .arg(&weights)
            .arg("--out")
            .arg(out)
            .args(["--levels", "0,1", "--patch", "16,16,8", "--gaussian", "--original-grid", "--f16"])
            .output()
            .unwrap()
    };
    let all = d.join("feats-all");
    let res = embed_folder(&ds.join("imagesTr"), &all);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    for f in ["level_0.npy", "level_1.npy", "level_0_original.npy", "level_1_original.npy"] {
        assert_eq!(
            std::fs::read(all.join("c0_0000").join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f} of c0 differs between the folder run and the single run"
        );
    }
    assert!((1..4).all(|c| all.join(format!("c{c}_0000/geometry.json")).is_file()));
    // A bad file among them stops the run with its name; the CTs before it are complete, and
    // it leaves no folder.
    let mixed = d.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(&ct, mixed.join("a.nii.gz")).unwrap();
    std::fs::write(mixed.join("b.nii.gz"), b"not a nifti file").unwrap();
    std::fs::copy(&ct, mixed.join("c.nii.gz")).unwrap();
    let mixed_out = d.join("feats-mixed");
    let res = embed_folder(&mixed, &mixed_out);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("b.nii.gz"), "{err}");
    assert!(
        mixed_out.join("a/geometry.json").is_file() && !mixed_out.join("b").exists() && !mixed_out.join("c").exists(),
        "{err}"
    );
}

/// A random backbone of the tests' size (base 4, 3 scales) saved as a checkpoint.
fn random_backbone(path: &Path, seed: u64) {
    let m = vox2vec::model::Vox2Vec::new(
        vox2vec::model::ModelConfig {
            fpn: vox2vec::model::FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 },
            ..Default::default()
        },
        seed,
    );
    vox2vec::checkpoint::save(path, &m.config, &m.store, None, &[]).unwrap();
}

#[test]
fn a_head_records_its_settings_and_predict_uses_them() {
    let d = tmpdir("recorded");
    let ds = blocks_dataset(&d);
    let out = d.join("probe");
    let bin = env!("CARGO_BIN_EXE_vox2vec");
    // A probe at a non-default spacing and patch (random backbone of seed 0).
    let res = Command::new(bin)
        .arg("probe")
        .arg(&ds)
        .arg("--out")
        .arg(&out)
        .args([
            "--base-channels",
            "4",
            "--num-scales",
            "3",
            "--spacing",
            "2,2,2",
            "--patch",
            "16,16,8",
            "--batch",
            "4",
            "--steps",
            "300",
            "--validate-every",
            "150",
            "--lr",
            "3e-2",
            "--val",
            "c1",
        ])
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let probe_dice = r["best_dice"][0].as_f64().unwrap();
    assert_eq!(
        r["best_dice_per_case"]["c1"][0].as_f64(),
        Some(probe_dice),
        "per-case Dice of the only validation case: {r}"
    );
    assert!(r["history"].as_array().unwrap().iter().all(|h| h["dice_per_case"]["c1"].is_array()), "{r}");
    assert_eq!(r["validation_cases_also_train"], serde_json::json!(false));
    let head = out.join("head.safetensors");
    let res = Command::new(bin).arg("inspect").arg(&head).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    for want in [
        "spacing_mm: [2.0,2.0,2.0]",
        "patch: [16,16,8]",
        "backbone_fingerprint: crc32:",
        "command_line: ",
        " probe ",
        "Dataset900_Blocks",
        "classes: [\"Bone\"]",
    ] {
        assert!(text.contains(want), "inspect lacks {want:?}:\n{text}");
    }

    let backbone = d.join("backbone.safetensors");
    random_backbone(&backbone, 0);
    let ct = ds.join("imagesTr/c1_0000.nii.gz");
    let predict = |mask: &Path, backbone: &Path, extra: &[&str]| {
        Command::new(bin)
            .arg("predict")
            .arg(&ct)
            .arg("--backbone")
            .arg(backbone)
            .arg("--head")
            .arg(&head)
            .arg("--out")
            .arg(mask)
            .args(extra)
            .output()
            .unwrap()
    };
    // No flags: the head's spacing and patch, and the probe's validation Dice on the same case,
    // measured where the probe measured it (both label maps taken to the 2 mm grid as
    // load_dataset takes labels).
    let mask = d.join("mask.nii.gz");
    let res = predict(&mask, &backbone, &[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success() && err.contains("spacing 2,2,2 mm, patch 16,16,8"), "{err}");
    let pre = vox2vec::data::preprocess::PreprocessConfig { spacing: [2.0; 3], ..Default::default() };
    let grid = vox2vec::data::cache::build(&ct, &pre).unwrap().ct;
    let on_grid = |p: &Path| {
        let raw: Vec<u8> = read_volume(p).unwrap().data.iter().map(|&v| v.round() as u8).collect();
        vox2vec::data::preprocess::preprocess_labels(&raw, &grid).unwrap().iter().map(|&l| l == 1).collect::<Vec<_>>()
    };
    let dice = vox2vec::eval::dice::dice(&on_grid(&mask), &on_grid(&ds.join("labelsTr/c1.nii.gz")));
    println!("probe validation Dice {probe_dice:.4}, predict's mask on the probe's grid {dice:.4}");
    assert!(
        probe_dice > 0.5 && (dice - probe_dice).abs() < 0.02,
        "predict {dice} does not reproduce the probe's {probe_dice}"
    );
    // A flag that contradicts the head: an error with both values, nothing written.
    let wrong = d.join("wrong.nii.gz");
    let res = predict(&wrong, &backbone, &["--spacing", "1,1,2"]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success()
            && err.contains("--spacing 1,1,2")
            && err.contains("spacing 2,2,2")
            && err.contains("--override-recorded")
            && !wrong.exists(),
        "{err}"
    );
    let res = predict(&wrong, &backbone, &["--patch", "32,32,8"]);
    assert!(!res.status.success() && String::from_utf8_lossy(&res.stderr).contains("patch 16,16,8"));
    let res = predict(&wrong, &backbone, &["--spacing", "1,1,2", "--override-recorded"]);
    assert!(res.status.success() && wrong.is_file(), "{}", String::from_utf8_lossy(&res.stderr));
    // Another backbone than the head's: refused, unless overridden.
    let other = d.join("other.safetensors");
    random_backbone(&other, 5);
    let res = predict(&d.join("o.nii.gz"), &other, &[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("another backbone") && !d.join("o.nii.gz").exists(), "{err}");
    let res = predict(&d.join("o.nii.gz"), &other, &["--override-recorded"]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    // Fine-tuning from a checkpoint that records a spacing refuses another one...
    let res = Command::new(bin)
        .arg("finetune")
        .arg(&ds)
        .arg("--weights")
        .arg(head_backbone_checkpoint(&d, &backbone))
        .arg("--out")
        .arg(d.join("ft"))
        .args(["--spacing", "1,1,2", "--patch", "16,16,8", "--steps", "2", "--val", "c1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("--spacing 1,1,2") && err.contains("3,3,3"), "{err}");
    // ...while a probe warns and goes on.
    let res = Command::new(bin)
        .arg("probe")
        .arg(&ds)
        .arg("--weights")
        .arg(head_backbone_checkpoint(&d, &backbone))
        .arg("--out")
        .arg(d.join("pr"))
        .args(["--spacing", "4,4,4", "--patch", "16,16,8", "--steps", "2", "--validate-every", "2", "--val", "c1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success() && err.contains("warning: --spacing 4,4,4 differs from the spacing 3,3,3"), "{err}");
}

/// `backbone` re-saved with a recorded spacing of 3 mm and patch 16,16,8 (as vox2vec-train writes).
fn head_backbone_checkpoint(d: &Path, backbone: &Path) -> PathBuf {
    let path = d.join("recorded-backbone.safetensors");
    let mut m = vox2vec::model::Vox2Vec::new(
        vox2vec::model::ModelConfig {
            fpn: vox2vec::model::FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 },
            ..Default::default()
        },
        1,
    );
    vox2vec::checkpoint::load(backbone, &mut m.store, None).unwrap();
    let meta = vox2vec::eval::recorded::preprocessing_metadata([3.0; 3], [16, 16, 8]);
    vox2vec::checkpoint::save(&path, &m.config, &m.store, None, &meta).unwrap();
    path
}

#[test]
fn a_one_case_dataset_says_how_to_probe_it() {
    let d = tmpdir("onecase");
    let ds = blocks_dataset(&d);
    for c in 1..4 {
        std::fs::remove_file(ds.join(format!("labelsTr/c{c}.nii.gz"))).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_vox2vec");
    let args = [
        "--base-channels",
        "4",
        "--num-scales",
        "3",
        "--patch",
        "16,16,8",
        "--batch",
        "2",
        "--steps",
        "4",
        "--validate-every",
        "2",
    ];
    let res = Command::new(bin).arg("probe").arg(&ds).arg("--out").arg(d.join("p")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("1 labelled case") && err.contains("--val c0 --train-on-val"),
        "{err}"
    );
    let res = Command::new(bin)
        .arg("probe")
        .arg(&ds)
        .arg("--out")
        .arg(d.join("p"))
        .args(args)
        .args(["--val", "c0", "--train-on-val"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&res.stdout).to_string() + &String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success() && text.contains("optimistic"), "{text}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("p/results.json")).unwrap()).unwrap();
    assert_eq!(
        (r["validation_cases_also_train"].as_bool(), r["train_cases"].clone()),
        (Some(true), serde_json::json!(["c0"]))
    );
    // A --val that names no case is an error listing the cases.
    let res = Command::new(bin)
        .arg("probe")
        .arg(&ds)
        .arg("--out")
        .arg(d.join("q"))
        .args(args)
        .args(["--val", "c9"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("--val c9") && err.contains("c0"), "{err}");
}
