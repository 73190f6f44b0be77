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
        let views: Vec<_> =
            owned.iter().map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
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
            .output()
            .unwrap();
        // No configuration flags: the base width and scales come from the tensors' shapes.
        assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
        assert_pyramid_is_the_fixtures(&f, &out, &format!("bare safetensors {}", f.name));
    }
}

/// `out/pyramid_<i>.npy` against the fixture's eval pyramid of patch 0 (bound 1e-4, the
/// fixtures' forward tolerance).
fn assert_pyramid_is_the_fixtures(f: &Fixture, out: &std::path::Path, what: &str) {
    let scales = f.config().fpn.num_scales;
    for i in 0..scales {
        let (shape, ours) =
            npy::read_f32(&out.join(format!("pyramid_{i}.npy"))).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let (es, expect) = f.f32(&format!("expect.eval.pyramid.{i}"));
        assert_eq!(shape, es[1..].to_vec(), "{what} level {i}");
        let n: usize = es[1..].iter().product();
        let e = rel_err(&ours, &expect[..n], 0.0);
        println!("embed {what} level {i}: rel err {e:.2e}");
        assert!(e < 1e-4, "{what} level {i}: {e}");
    }
    assert!(!out.join(format!("pyramid_{scales}.npy")).exists(), "{what}: more levels than the fixture's {scales}");
}

/// Patch 0 of the fixture's x1 as an X×Y×Z .npy in `dir`.
fn fixture_patch(f: &Fixture, dir: &std::path::Path) -> std::path::PathBuf {
    let (s, x) = f.f32("input.x1");
    let patch = dir.join(format!("x_{}.npy", f.name));
    npy::write_f32(&patch, &[s[2], s[3], s[4]], &x[..s[2] * s[3] * s[4]]).unwrap();
    patch
}

fn vox2vec(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vox2vec")).args(args).output().unwrap()
}

/// Weights as PyTorch users publish them (tests/data/weights, made from the fixtures by
/// dev/make-weights-fixtures.py): torch.save zip and legacy .pt files of a bare FPN3d
/// state_dict (as the reference's vox2vec_contrastive.pt), Lightning .ckpt files with
/// backbone. / model.backbone. prefixes and optimiser state. `embed` with no configuration
/// flags gives the fixture's eval pyramid from each; `convert` writes a safetensors state_dict
/// that gives the same; a contradicting --base-channels is an error naming both values.
#[test]
fn published_weight_files_embed_without_configuration_flags() {
    let dir = tmpdir("published");
    let weights_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/weights");
    let mut files: Vec<_> = std::fs::read_dir(&weights_dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let fixtures: Vec<Fixture> = fixture_files().iter().map(|p| Fixture::load(p)).collect();
    let mut seen = std::collections::BTreeSet::new();
    for w in &files {
        let file = w.file_name().unwrap().to_string_lossy().into_owned();
        let stem = |f: &Fixture| f.name.trim_end_matches(".safetensors").to_string();
        let f = fixtures
            .iter()
            .find(|f| file.starts_with(&format!("{}.", stem(f))) || file.starts_with(&format!("{}_", stem(f))))
            .unwrap_or_else(|| panic!("{file}: no fixture of that name"));
        seen.insert(
            w.extension().unwrap().to_string_lossy().into_owned()
                + if file.contains("legacy") { " legacy" } else { "" },
        );
        let patch = fixture_patch(f, &dir);
        let out = dir.join(format!("out_{file}"));
        let res = vox2vec(&[
            "embed".as_ref(),
            patch.as_os_str(),
            "--weights".as_ref(),
            w.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        assert!(res.status.success(), "{file}: {}", String::from_utf8_lossy(&res.stderr));
        let note = String::from_utf8_lossy(&res.stderr);
        assert!(
            note.contains(&format!("base {} x {} scales", f.config().fpn.base_channels, f.config().fpn.num_scales)),
            "{file}: {note}"
        );
        assert_pyramid_is_the_fixtures(f, &out, &file);

        // convert: a bare safetensors state_dict that records the configuration.
        let converted = dir.join(format!("{file}.safetensors"));
        let res = vox2vec(&["convert".as_ref(), w.as_os_str(), converted.as_os_str()]);
        assert!(res.status.success(), "convert {file}: {}", String::from_utf8_lossy(&res.stderr));
        let bytes = std::fs::read(&converted).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(
            st.names().iter().all(|n| !n.starts_with("backbone.") && !n.contains("proj_head")),
            "{file}: converted keys are bare FPN3d keys"
        );
        assert_eq!(st.tensor("first_conv.weight").unwrap().shape()[0], f.config().fpn.base_channels);
        let out2 = dir.join(format!("out2_{file}"));
        let res = vox2vec(&[
            "embed".as_ref(),
            patch.as_os_str(),
            "--weights".as_ref(),
            converted.as_os_str(),
            "--out".as_ref(),
            out2.as_os_str(),
        ]);
        assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
        for i in 0..f.config().fpn.num_scales {
            let a = std::fs::read(out.join(format!("pyramid_{i}.npy"))).unwrap();
            let b = std::fs::read(out2.join(format!("pyramid_{i}.npy"))).unwrap();
            assert!(a == b, "{file}: the converted file must give the same pyramid bit for bit (level {i})");
        }

        // A flag that contradicts the file: refused, naming both values, nothing written.
        let wrong = f.config().fpn.base_channels * 2;
        let out3 = dir.join(format!("out3_{file}"));
        let res = vox2vec(&[
            "embed".as_ref(),
            patch.as_os_str(),
            "--weights".as_ref(),
            w.as_os_str(),
            "--out".as_ref(),
            out3.as_os_str(),
            "--base-channels".as_ref(),
            wrong.to_string().as_ref(),
        ]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            !res.status.success()
                && err.contains(&format!("--base-channels {wrong}"))
                && err.contains(&format!("base {} x", f.config().fpn.base_channels)),
            "{file}: {err}"
        );
        assert!(!out3.exists(), "{file}: a refused run leaves no output");
    }
    let want: std::collections::BTreeSet<String> = ["pt", "pt legacy", "ckpt"].iter().map(|s| s.to_string()).collect();
    assert_eq!(
        seen, want,
        "tests/data/weights must hold zip .pt, legacy .pt and .ckpt files (dev/make-weights-fixtures.py)"
    );
}

/// A Lightning checkpoint's projection head (`proj_head.`) loads into our head, its
/// optimiser state is left out and listed, and `inspect` says what the file is.
#[test]
fn lightning_checkpoint_maps_backbone_and_projection_head() {
    use vox2vec::weights::{Naming, read};
    let w = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/weights/fpn_tiny_model.ckpt");
    let file = read(&w, Naming::Model).unwrap();
    assert!(file.lightning);
    assert!(
        file.ignored.iter().all(|k| k.starts_with("optimizer_states.")) && !file.ignored.is_empty(),
        "{:?}",
        file.ignored
    );
    let fixture = fixture_files().into_iter().find(|p| p.ends_with("fpn_tiny.safetensors")).unwrap();
    let f = Fixture::load(&fixture);
    assert_eq!(file.infer_backbone().unwrap(), f.config().fpn);
    assert_eq!(file.infer_proj_dim(), Some(f.config().proj_dim));
    let mut m = Vox2Vec::new(f.config(), 99);
    let loaded = vox2vec::checkpoint::load_file(file, &mut m.store, None).unwrap();
    assert!(loaded.missing.is_empty(), "{:?}", loaded.missing);
    let reference = f.model();
    for (a, b) in m.store.slots().iter().zip(reference.store.slots()) {
        assert_eq!(a.name, b.name);
        if a.value.dtype() == vox2vec::tensor::DType::F32 {
            assert_eq!(a.value.f32s(), b.value.f32s(), "{}", a.name);
        } else {
            assert_eq!(a.value.i64s(), b.value.i64s(), "{}", a.name);
        }
    }
    let res = vox2vec(&["inspect".as_ref(), w.as_os_str()]);
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success()
            && text.contains("Lightning")
            && text.contains("model.backbone.")
            && text.contains("inferred from the tensors")
            && text.contains("head: 16 tensors"),
        "{text}"
    );
}

#[test]
fn whole_volume_embedding_stitches_window_features() {
    let cfg = ModelConfig {
        fpn: FpnConfig { in_channels: 1, base_channels: 2, num_scales: 3 },
        proj_dim: 4,
        temperature: 0.1,
    };
    let mut m = Vox2Vec::new(cfg, 4);
    let patch = [8usize, 8, 4];
    // One window exactly: the stitched map is the window's pyramid.
    let x1: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
    let maps = embed_volume(&mut m, &x1, patch, patch, &[0, 1], Blend::Central, 1, &|_, _| {}).unwrap();
    let gauss = embed_volume(&mut m, &x1, patch, patch, &[0, 1], Blend::Gaussian, 1, &|_, _| {}).unwrap();
    for (a, b) in maps.iter().zip(&gauss) {
        assert!(
            rel_err(&b.values, &a.values, 0.0) < 1e-6,
            "one window: Gaussian blending must return the window itself"
        );
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
                    if plan.axes[0].owner[gx] == which[0]
                        && plan.axes[1].owner[gy] == which[1]
                        && plan.axes[2].owner[gz] == which[2]
                    {
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

/// `embed --format nifti`: each level as a 4-D float32 NIfTI (channels on the 4th axis) equal
/// to the .npy, whose affine places it in the input's world. The input is stored with its file
/// axes permuted and flipped against the world (file axis 0 = -y, 1 = +x, 2 = +z, an origin
/// off zero). Two routes to the input's grid must agree: the level's own affine (world of an
/// input voxel → nearest level voxel) and --original-grid's resampling (level_<i>_original.*,
/// whose NIfTI carries the input's affine).
#[test]
fn features_as_nifti_sit_in_the_inputs_world() {
    use vox2vec::data::nifti_io::header_affine;
    let dir = tmpdir("nifti");
    // Canonical phantom (x, y, z world-increasing) at 1 x 1.5 x 2 mm.
    let shape = [40usize, 36, 14];
    let hu = vox2vec::data::phantom::phantom_ct(3, shape, [1.0, 1.5, 2.0]);
    let affine = [[0.0, 1.0, 0.0, 10.0], [-1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 2.0, 30.0], [0.0, 0.0, 0.0, 1.0]];
    let ct = dir.join("ct.nii.gz");
    let file_shape = common::write_ct_with_affine(&ct, &hu, shape, affine);
    assert_eq!(file_shape, [shape[1], shape[0], shape[2]]);
    let cfg = ModelConfig {
        fpn: FpnConfig { in_channels: 1, base_channels: 2, num_scales: 3 },
        proj_dim: 4,
        temperature: 0.1,
    };
    let m = Vox2Vec::new(cfg, 5);
    let w = dir.join("w.safetensors");
    vox2vec::checkpoint::save(&w, &m.config, &m.store, None, &[]).unwrap();
    let out = dir.join("out");
    let res = vox2vec(&[
        "embed".as_ref(),
        ct.as_os_str(),
        "--weights".as_ref(),
        w.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--format".as_ref(),
        "npy,nifti".as_ref(),
        "--levels".as_ref(),
        "0,1".as_ref(),
        "--original-grid".as_ref(),
        "--spacing".as_ref(),
        "2,2,2".as_ref(),
        "--patch".as_ref(),
        "16,16,8".as_ref(),
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let read = |p: &std::path::Path| {
        use nifti::{IntoNdArray, NiftiObject};
        let obj = nifti::ReaderOptions::new().read_file(p).unwrap();
        let h = obj.header().clone();
        let a = obj.into_volume().into_ndarray::<f32>().unwrap();
        (h, a)
    };
    let src_affine = header_affine(&read(&ct).0);
    let inv = |a: &[[f64; 4]; 4]| -> [[f64; 4]; 4] {
        let m = nalgebra::Matrix4::from_fn(|r, c| a[r][c]).try_inverse().unwrap();
        std::array::from_fn(|r| std::array::from_fn(|c| m[(r, c)]))
    };
    let apply = |a: &[[f64; 4]; 4], p: [f64; 3]| -> [f64; 3] {
        std::array::from_fn(|r| a[r][0] * p[0] + a[r][1] * p[1] + a[r][2] * p[2] + a[r][3])
    };
    for level in [0usize, 1] {
        let (h, feat) = read(&out.join(format!("level_{level}.nii.gz")));
        let (ns, npy_v) = npy::read_f32(&out.join(format!("level_{level}.npy"))).unwrap();
        let c = ns[0];
        assert_eq!(h.dim[0], 4);
        assert_eq!(feat.shape(), &[ns[1], ns[2], ns[3], c], "level {level}: X x Y x Z x C");
        assert_eq!(h.datatype, nifti::NiftiType::Float32 as i16);
        let sp = ns[1] * ns[2] * ns[3];
        for (i, v) in feat.indexed_iter() {
            let (x, y, z, ch) = (i[0], i[1], i[2], i[3]);
            assert_eq!(*v, npy_v[ch * sp + (x * ns[2] + y) * ns[3] + z], "level {level} voxel {i:?}");
        }
        // The level's affine against --original-grid: the input voxel's world point, taken to
        // the level grid by the inverse affine, lands on the level voxel whose features the
        // resampled map holds there.
        let level_affine = header_affine(&h);
        let to_level = mul4(&inv(&level_affine), &src_affine);
        let (oh, orig) = read(&out.join(format!("level_{level}_original.nii.gz")));
        assert_eq!(header_affine(&oh), src_affine, "the original-grid NIfTI has the input's affine");
        assert_eq!(orig.shape(), &[file_shape[0], file_shape[1], file_shape[2], c]);
        let (mut checked, mut agree) = (0, 0);
        for fx in (0..file_shape[0]).step_by(3) {
            for fy in (0..file_shape[1]).step_by(3) {
                for fz in 0..file_shape[2] {
                    let want: Vec<f32> = (0..c).map(|ch| orig[[fx, fy, fz, ch]]).collect();
                    if want.iter().all(|v| *v == 0.0) {
                        continue; // outside the crop box
                    }
                    let p = apply(&to_level, [fx as f64, fy as f64, fz as f64]);
                    let q: Vec<usize> =
                        (0..3).map(|a| p[a].round().clamp(0.0, (feat.shape()[a] - 1) as f64) as usize).collect();
                    let got: Vec<f32> = (0..c).map(|ch| feat[[q[0], q[1], q[2], ch]]).collect();
                    checked += 1;
                    agree += (got == want) as usize;
                }
            }
        }
        // Rounding at exact half-voxel positions may pick the neighbour; nearly all must agree.
        println!("level {level}: {agree}/{checked} input voxels agree");
        assert!(checked > 100 && agree as f64 >= 0.97 * checked as f64, "level {level}: {agree} of {checked}");
    }
}

fn mul4(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]) -> [[f64; 4]; 4] {
    std::array::from_fn(|i| std::array::from_fn(|j| (0..4).map(|k| a[i][k] * b[k][j]).sum()))
}
