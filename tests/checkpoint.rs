//! Checkpoints: round trip, PyTorch-converted FPN3d state_dicts, and bad files.

mod common;

use common::{Fixture, fixture_files, rel_err};
use safetensors::tensor::{Dtype, TensorView};
use vox2vec::autograd::{Graph, Var};
use vox2vec::checkpoint;
use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};
use vox2vec::optim::{Adam, AdamConfig};
use vox2vec::tensor::{Tensor, ncxyz_to_nxyzc, nxyzc_to_ncxyz};
use vox2vec::train::{BatchShape, pretrain_step, synthetic_batch};

fn tiny() -> ModelConfig {
    ModelConfig { fpn: FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 }, proj_dim: 8, temperature: 0.1 }
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn same_store(a: &Vox2Vec, b: &Vox2Vec) -> bool {
    a.store.slots().iter().zip(b.store.slots()).all(|(x, y)| {
        x.name == y.name
            && match x.value.dtype() {
                vox2vec::tensor::DType::I64 => x.value.i64s() == y.value.i64s(),
                _ => x.value.f32s() == y.value.f32s(),
            }
    })
}

#[test]
fn round_trip_restores_parameters_buffers_and_optimizer() {
    let dir = tmpdir("roundtrip");
    let mut m = Vox2Vec::new(tiny(), 3);
    let mut adam = Adam::new(AdamConfig::default(), &m.store);
    let shape = BatchShape { pairs: 2, patch: [16, 16, 8], voxels_per_pair: 8 };
    for i in 0..2 {
        pretrain_step(&mut m, &mut adam, &synthetic_batch(shape, 1, i)).unwrap();
    }
    let path = dir.join("ckpt.safetensors");
    checkpoint::save(&path, &m.config, &m.store, Some(&adam), &[]).unwrap();
    let mut m2 = Vox2Vec::new(tiny(), 99);
    let mut adam2 = Adam::new(AdamConfig::default(), &m2.store);
    assert!(!same_store(&m, &m2));
    let loaded = checkpoint::load(&path, &mut m2.store, Some(&mut adam2)).unwrap();
    assert!(loaded.missing.is_empty(), "{:?}", loaded.missing);
    assert_eq!(loaded.step, Some(2));
    assert!(same_store(&m, &m2));
    assert_eq!(adam2.step, 2);
    assert_eq!(adam.exp_avg, adam2.exp_avg);
    assert_eq!(adam.exp_avg_sq, adam2.exp_avg_sq);
    // num_batches_tracked is int64 and counts both views of both steps.
    let nbt = m2.store.find("backbone.first_conv.weight").unwrap();
    assert_eq!(m2.store.pytorch_shape(nbt), vec![4, 1, 3, 3, 3]);
    let slot = m2.store.find("backbone.left_blocks.0.layers.0.layers.0.num_batches_tracked").unwrap();
    assert_eq!(m2.store.get(slot).i64s(), &[4]);
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// A bare FPN3d state_dict (what the README's PyTorch conversion writes) loads unchanged and
/// reproduces the reference eval pyramid.
#[test]
fn pytorch_state_dict_loads_unchanged() {
    let dir = tmpdir("torch");
    for path in fixture_files() {
        let f = Fixture::load(&path);
        let keys = f.keys_with_prefix("param.backbone.");
        let mut owned = Vec::new();
        for k in &keys {
            let (shape, val) = &f.tensors[k];
            let (dtype, bytes): (Dtype, Vec<u8>) = match val {
                common::Value::F32(v) => (Dtype::F32, bytemuck::cast_slice(v).to_vec()),
                common::Value::I64(v) => (Dtype::I64, bytemuck::cast_slice(v).to_vec()),
            };
            owned.push((k["param.backbone.".len()..].to_string(), dtype, shape.clone(), bytes));
        }
        let views: Vec<_> =
            owned.iter().map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        let file = dir.join(format!("torch_{}", f.name));
        std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();

        let mut m = Vox2Vec::new(f.config(), 5);
        let loaded = checkpoint::load(&file, &mut m.store, None).unwrap();
        assert_eq!(loaded.loaded_keys, keys.len());
        assert!(loaded.missing.iter().all(|k| k.starts_with("head.")), "backbone keys missing: {:?}", loaded.missing);
        let (s, x) = f.f32("input.x1");
        let x = Tensor::from_f32(&[s[0], s[2], s[3], s[4], s[1]], ncxyz_to_nxyzc(x, s[0], s[1], s[2] * s[3] * s[4]));
        let pyr = m.pyramid(&Graph::inference(), &Var::constant(x)).unwrap();
        for (i, p) in pyr.iter().enumerate() {
            let ps = p.shape();
            let ours = nxyzc_to_ncxyz(p.value.f32s(), ps[0], ps[4], ps[1] * ps[2] * ps[3]);
            let e = rel_err(&ours, f.f32(&format!("expect.eval.pyramid.{i}")).1, 0.0);
            assert!(e < 1e-4, "{}: level {i} error {e:.2e}", f.name);
        }
    }
}

#[test]
fn bad_files_are_clear_errors_and_change_nothing() {
    let dir = tmpdir("bad");
    let mut m = Vox2Vec::new(tiny(), 3);
    let before: Vec<Vec<f32>> = m
        .store
        .slots()
        .iter()
        .filter(|s| s.value.dtype() == vox2vec::tensor::DType::F32)
        .map(|s| s.value.f32s().to_vec())
        .collect();
    let unchanged = |m: &Vox2Vec| {
        let now: Vec<Vec<f32>> = m
            .store
            .slots()
            .iter()
            .filter(|s| s.value.dtype() == vox2vec::tensor::DType::F32)
            .map(|s| s.value.f32s().to_vec())
            .collect();
        now == before
    };

    let missing = dir.join("nope.safetensors");
    let e = checkpoint::load(&missing, &mut m.store, None).unwrap_err();
    assert!(format!("{e:#}").contains("nope.safetensors"), "{e:#}");

    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a checkpoint").unwrap();
    let e = checkpoint::load(&garbage, &mut m.store, None).unwrap_err();
    assert!(format!("{e:#}").contains("garbage.safetensors"), "{e:#}");

    // Truncated: a valid file cut in half.
    let good = dir.join("good.safetensors");
    checkpoint::save(&good, &m.config, &m.store, None, &[]).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(checkpoint::load(&cut, &mut m.store, None).is_err());

    // Another model's checkpoint: a shape mismatch, reported before anything is loaded.
    let other = Vox2Vec::new(ModelConfig { fpn: FpnConfig { base_channels: 8, ..tiny().fpn }, ..tiny() }, 1);
    let other_path = dir.join("other.safetensors");
    checkpoint::save(&other_path, &other.config, &other.store, None, &[]).unwrap();
    let e = checkpoint::load(&other_path, &mut m.store, None).unwrap_err();
    assert!(format!("{e:#}").contains("shape"), "{e:#}");
    assert!(unchanged(&m), "a failed load modified the model");
}

/// `vox2vec export-backbone` writes bare FPN3d keys that load back into the same backbone;
/// `vox2vec inspect` reads the checkpoint; a missing file is a clear non-zero exit.
#[test]
fn cli_export_backbone_round_trips() {
    let dir = tmpdir("export");
    let m = Vox2Vec::new(tiny(), 8);
    let ckpt = dir.join("model.safetensors");
    checkpoint::save(&ckpt, &m.config, &m.store, None, &[]).unwrap();
    let bin = env!("CARGO_BIN_EXE_vox2vec");
    let out = std::process::Command::new(bin).arg("inspect").arg(&ckpt).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("model_config") && text.contains("backbone:"), "{text}");

    let exported = dir.join("fpn3d.safetensors");
    let out = std::process::Command::new(bin).arg("export-backbone").arg(&ckpt).arg(&exported).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&exported).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.names().iter().all(|n| !n.starts_with("backbone.") && !n.starts_with("head.")));
    assert!(st.names().contains(&"first_conv.weight"));
    let mut m2 = Vox2Vec::new(tiny(), 9);
    checkpoint::load(&exported, &mut m2.store, None).unwrap();
    for (a, b) in m.store.slots().iter().zip(m2.store.slots()) {
        if a.name.starts_with("backbone.") && a.value.dtype() == vox2vec::tensor::DType::F32 {
            assert_eq!(a.value.f32s(), b.value.f32s(), "{}", a.name);
        }
    }

    let out = std::process::Command::new(bin).arg("inspect").arg(dir.join("missing.safetensors")).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.safetensors"));

    // `inspect --all | head`: the reader goes away before anything is written; the tool dies of
    // SIGPIPE like other Unix tools instead of panicking in println!. The read end is closed
    // before the tool starts (closing it after spawn raced with a fast tool on a loaded machine,
    // which could write all its output into the pipe's buffer first and exit 0).
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = std::process::Command::new(bin)
        .args(["inspect", "--all"])
        .arg(&ckpt)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.signal(), Some(13), "expected death by SIGPIPE: {:?} {err}", out.status);
}

#[test]
fn non_finite_weights_never_replace_a_checkpoint() {
    let dir = tmpdir("nonfinite");
    let path = dir.join("checkpoint.safetensors");
    let mut m = Vox2Vec::new(tiny(), 3);
    let adam = Adam::new(AdamConfig::default(), &m.store);
    checkpoint::save(&path, &m.config, &m.store, Some(&adam), &[]).unwrap();
    let good = std::fs::read(&path).unwrap();
    let slot = m.store.trainable().next().unwrap();
    let name = m.store.slots()[slot].name.clone();
    m.store.update_f32(slot, |v| {
        v[0] = f32::NAN;
        v[1] = f32::INFINITY;
    });
    let e = format!("{:#}", checkpoint::save(&path, &m.config, &m.store, Some(&adam), &[]).unwrap_err());
    assert!(e.contains(&name) && e.contains("2 non-finite"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), good, "the good checkpoint was changed");
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "checkpoint.safetensors")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `vox2vec-train --resume-from` a published PyTorch file: the backbone's configuration comes
/// from the file (no flags), a bare FPN3d starts a new projection head, a Lightning checkpoint
/// brings its own, and a contradicting flag is refused naming both values.
#[test]
fn pretraining_continues_from_published_pytorch_weights() {
    let dir = tmpdir("published-resume");
    let weights = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/weights");
    let bin = env!("CARGO_BIN_EXE_vox2vec-train");
    // A bare backbone gets the default projection width (128); the Lightning file's head maps to 16.
    for (file, says, proj_dim) in [
        ("fpn_tiny.pt", "projection head is not in the file", 128),
        ("fpn_tiny_model.ckpt", "without optimiser state", 16),
    ] {
        let out = dir.join(file);
        let res = std::process::Command::new(bin)
            .args(["--small", "--steps", "1", "--device", "cpu", "--resume-from"])
            .arg(weights.join(file))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(res.status.success(), "{file}: {err}");
        assert!(err.contains("base 4 x 3 scales") && err.contains(says), "{file}: {err}");
        let mut m = Vox2Vec::new(
            vox2vec::model::ModelConfig {
                fpn: vox2vec::model::FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 },
                proj_dim,
                temperature: 0.1,
            },
            0,
        );
        let loaded = checkpoint::load(&out.join("checkpoint.safetensors"), &mut m.store, None).unwrap();
        assert_eq!(loaded.step, Some(1), "{file}");
    }
    let res = std::process::Command::new(bin)
        .args(["--small", "--steps", "1", "--device", "cpu", "--num-scales", "6", "--resume-from"])
        .arg(weights.join("fpn_tiny.pt"))
        .arg("--out")
        .arg(dir.join("bad"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("--num-scales 6") && err.contains("base 4 x 3 scales"), "{err}");
}
