//! The data path through the binaries: input discovery (folders, nnU-Net datasets, path
//! lists), `vox2vec preprocess` (resumable, per-file errors), and `vox2vec-train` on a folder
//! with bad files (stop by default, skip with --skip-bad, summary, exit codes).

use std::path::{Path, PathBuf};
use std::process::Command;

use vox2vec::data::nifti_io::{Geometry, Orientation, write_volume};
use vox2vec::data::phantom::phantom_ct;
use vox2vec::data::sources::discover;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-datacli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Write an int16 CT on an axis-aligned grid with the given spacing.
fn write_ct(path: &Path, hu: &[i16], shape: [usize; 3], spacing: [f32; 3]) {
    let header = nifti::NiftiHeader {
        sform_code: 1,
        srow_x: [spacing[0], 0.0, 0.0, 0.0],
        srow_y: [0.0, spacing[1], 0.0, 0.0],
        srow_z: [0.0, 0.0, spacing[2], 0.0],
        pixdim: [1.0, spacing[0], spacing[1], spacing[2], 1.0, 0.0, 0.0, 0.0],
        ..nifti::NiftiHeader::default()
    };
    let g = Geometry {
        header,
        affine: [[0.0; 4]; 4],
        file_shape: shape,
        orientation: Orientation { perm: [0, 1, 2], flip: [false; 3] },
    };
    write_volume(path, hu, &g).unwrap();
}

/// A folder with one good CT, one corrupt file, one volume smaller than the patch, one without body.
fn mixed_folder(name: &str) -> PathBuf {
    let d = tmpdir(name);
    let shape = [96, 80, 40];
    write_ct(&d.join("good.nii.gz"), &phantom_ct(1, shape, [1.0, 1.0, 2.0]), shape, [1.0, 1.0, 2.0]);
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/corrupt.nii.gz"), b"\x1f\x8b\x08\x00garbage").unwrap();
    let mut tiny = vec![-1000i16; 12 * 12 * 6];
    for (i, v) in tiny.iter_mut().enumerate() {
        let (x, y) = (i / 72, (i / 6) % 12);
        if (3..9).contains(&x) && (3..9).contains(&y) {
            *v = 40;
        }
    }
    write_ct(&d.join("tiny.nii"), &tiny, [12, 12, 6], [1.0, 1.0, 2.0]);
    write_ct(&d.join("air.nii.gz"), &vec![-1000i16; 8000], [20, 20, 20], [1.0, 1.0, 2.0]);
    d
}

const TINY: &[&str] = &[
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
    "2",
];

#[test]
fn discovery_of_folders_datasets_and_lists() {
    let d = mixed_folder("discover");
    let found = discover(&d).unwrap();
    assert_eq!(found.len(), 4, "{found:?}");
    let list = d.join("list.txt");
    std::fs::write(&list, "# two files\ngood.nii.gz\n\n").unwrap();
    std::fs::write(d.join("sub/list2.txt"), format!("{}\n", d.join("tiny.nii").display())).unwrap();
    assert_eq!(discover(&list).unwrap(), vec![d.join("good.nii.gz")]);
    assert_eq!(discover(&d.join("sub/list2.txt")).unwrap(), vec![d.join("tiny.nii")]);
    // nnU-Net raw: only imagesTr.
    let ds = tmpdir("nnunet");
    std::fs::create_dir_all(ds.join("imagesTr")).unwrap();
    std::fs::create_dir_all(ds.join("labelsTr")).unwrap();
    std::fs::write(ds.join("dataset.json"), "{}").unwrap();
    std::fs::copy(d.join("good.nii.gz"), ds.join("imagesTr/case_0000.nii.gz")).unwrap();
    std::fs::copy(d.join("good.nii.gz"), ds.join("labelsTr/case.nii.gz")).unwrap();
    assert_eq!(discover(&ds).unwrap(), vec![ds.join("imagesTr/case_0000.nii.gz")]);
    // A folder of datasets (e.g. nnUNet_raw): still no label map taken for a CT.
    let parent = ds.parent().unwrap().join(format!("vox2vec-datacli-raw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::create_dir_all(&parent).unwrap();
    let inner = parent.join("Dataset001_X");
    std::fs::rename(&ds, &inner).unwrap();
    std::fs::copy(d.join("good.nii.gz"), parent.join("loose.nii.gz")).unwrap();
    assert_eq!(discover(&parent).unwrap(), vec![inner.join("imagesTr/case_0000.nii.gz"), parent.join("loose.nii.gz")]);
    assert!(discover(&d.join("missing")).is_err());
    assert!(discover(&tmpdir("empty")).unwrap_err().to_string().contains("no CT found"));
}

#[test]
fn preprocess_command_reports_bad_files_and_resumes() {
    let d = mixed_folder("pre");
    let cache = d.join("cache");
    let bin = env!("CARGO_BIN_EXE_vox2vec");
    let out = Command::new(bin).args(["preprocess"]).arg(&d).arg("--cache").arg(&cache).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bad files must make the exit code non-zero:\n{text}");
    assert!(text.contains("corrupt.nii.gz") && text.contains("air.nii.gz"), "{text}");
    assert!(text.contains("no body"), "{text}");
    let out = Command::new(bin).args(["preprocess", "--skip-bad"]).arg(&d).arg("--cache").arg(&cache).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("0 preprocessed now, 2 already in"), "resume did not reuse the cache:\n{text}");
    // Only whole entries: no temporary files left.
    assert!(std::fs::read_dir(&cache).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.')));
}

#[test]
fn train_stops_on_bad_files_unless_asked_to_skip() {
    let d = mixed_folder("train");
    let bin = env!("CARGO_BIN_EXE_vox2vec-train");
    let out_dir = d.join("run");
    let out = Command::new(bin)
        .arg(&d)
        .arg("--cache")
        .arg(d.join("cache"))
        .arg("--out")
        .arg(&out_dir)
        .args(TINY)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("unusable") && err.contains("corrupt.nii.gz") && err.contains("--skip-bad"), "{err}");
    assert!(!out_dir.join("checkpoint.safetensors").exists());
    let out = Command::new(bin)
        .arg(&d)
        .arg("--skip-bad")
        .arg("--cache")
        .arg(d.join("cache"))
        .arg("--out")
        .arg(&out_dir)
        .args(TINY)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1 usable") && err.contains("3 unusable") && err.contains("smaller than the patch"), "{err}");
    assert!(out_dir.join("checkpoint.safetensors").is_file() && out_dir.join("loss.png").is_file());
    // Nothing usable: non-zero exit.
    let bad = tmpdir("allbad");
    std::fs::write(bad.join("x.nii"), b"nope").unwrap();
    let out = Command::new(bin)
        .arg(&bad)
        .arg("--skip-bad")
        .arg("--cache")
        .arg(bad.join("cache"))
        .arg("--out")
        .arg(bad.join("run"))
        .args(TINY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no usable volume"));
}

#[test]
fn a_cache_that_cannot_be_written_stops_the_run_as_a_cache_problem() {
    let d = mixed_folder("cachefail");
    // A regular file where the cache folder should be: no entry can be written (as on a full
    // disk or a read-only folder, which root, running these tests, would not see).
    let cache = d.join("not-a-folder");
    std::fs::write(&cache, b"x").unwrap();
    let bin = env!("CARGO_BIN_EXE_vox2vec");
    let out = Command::new(bin).args(["preprocess", "--skip-bad"]).arg(&d).arg("--cache").arg(&cache).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("cannot write the preprocessing cache") && text.contains("--cache"), "{text}");
    assert!(!text.contains("unusable"), "a cache failure was blamed on an input file:\n{text}");
}

/// `bytes` (a single-file NIfTI-1, little-endian) with `v` written at byte `at`.
fn patched(bytes: &[u8], at: usize, v: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + v.len()].copy_from_slice(v);
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// The issue's "done when": one folder mixing good CTs with every malformed-input class,
/// through `vox2vec preprocess --skip-bad`: each bad file named with its problem, each good one
/// cached (the one with an extension gap read exactly like the plain one), no panic; then the
/// NaN file repaired by `--nonfinite minimum`, reported as such.
#[test]
fn preprocess_skip_bad_names_every_malformed_class_and_caches_every_good_file() {
    let d = tmpdir("classes");
    let shape = [48, 40, 20];
    let hu = phantom_ct(3, shape, [1.0, 1.0, 2.0]);
    write_ct(&d.join("good.nii"), &hu, shape, [1.0, 1.0, 2.0]);
    let good = std::fs::read(d.join("good.nii")).unwrap();
    assert_eq!(f32::from_le_bytes(good[108..112].try_into().unwrap()), 352.0);
    std::fs::write(d.join("good-gz.nii.gz"), gzip(&good)).unwrap();
    // Voxels at byte 1024 after a gap (extension flag 0): valid, must be read from 1024.
    let mut gap = patched(&good[..352], 108, &1024f32.to_le_bytes());
    gap.resize(1024, 0);
    gap.extend_from_slice(&good[352..]);
    std::fs::write(d.join("gap.nii"), &gap).unwrap();
    let f32s = |v: f32| v.to_le_bytes();
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("spacing-1e30.nii", patched(&good, 280, &f32s(1e30)), "more than the limit"),
        ("vox-offset-100.nii", patched(&good, 108, &f32s(100.0)), "vox_offset"),
        ("vox-offset-past-end.nii", patched(&good, 108, &f32s(1e9)), "past the end"),
        ("nan-affine.nii", patched(&good, 292, &f32s(f32::NAN)), "non-finite"),
        ("inf-intercept.nii", patched(&patched(&good, 112, &f32s(1.0)), 116, &f32s(f32::INFINITY)), "scl_inter is inf"),
        ("oblique.nii", patched(&good, 284, &f32s(0.5)), "oblique"),
        ("truncated.nii", good[..good.len() / 2].to_vec(), "truncated"),
        ("four-d.nii", patched(&patched(&good, 40, &4i16.to_le_bytes()), 48, &3i16.to_le_bytes()), "volumes"),
        ("huge-dims.nii", patched(&good, 42, &[0xff, 0x7f, 0xff, 0x7f, 0xff, 0x7f]), "limit"),
        ("negative-dim.nii", patched(&good, 42, &(-5i16).to_le_bytes()), "dimensions"),
        ("complex.nii", patched(&good, 70, &32i16.to_le_bytes()), "data type"),
        ("not-nifti.nii", b"nope".to_vec(), "NIfTI"),
        (
            "air.nii.gz",
            gzip(
                &patched(&good, 112, &f32s(0.0))[..352]
                    .iter()
                    .chain(&[0x18u8, 0xfc].repeat(shape.iter().product()))
                    .copied()
                    .collect::<Vec<u8>>(),
            ),
            "no body",
        ),
        (
            "gz-bad-crc.nii.gz",
            {
                let mut g = gzip(&good);
                let n = g.len();
                g[n - 8] ^= 0xff;
                g
            },
            "gzip",
        ),
        (
            "gz-bad-isize.nii.gz",
            {
                let mut g = gzip(&good);
                let n = g.len();
                g[n - 1] ^= 0x01;
                g
            },
            "gzip",
        ),
        (
            "gz-cut-trailer.nii.gz",
            {
                let g = gzip(&good);
                g[..g.len() - 4].to_vec()
            },
            "gzip",
        ),
        (
            "gz-body-flip.nii.gz",
            {
                let mut g = gzip(&good);
                let n = g.len();
                g[n / 2] ^= 0x55;
                g
            },
            "gzip",
        ),
        (
            "gz-trailing-garbage.nii.gz",
            {
                let mut g = gzip(&good);
                g.extend_from_slice(b"trailing bytes");
                g
            },
            "gzip",
        ),
    ];
    for (name, bytes, _) in &bad {
        std::fs::write(d.join(name), bytes).unwrap();
    }
    // NaN voxels in a float32 CT: refused by default, repaired with --nonfinite minimum.
    let mut nan_hu: Vec<f32> = hu.iter().map(|&v| v as f32).collect();
    for i in [0, 7, 1000, 5000] {
        nan_hu[i] = f32::NAN;
    }
    nan_hu[2000] = f32::NEG_INFINITY;
    let g = Geometry {
        header: nifti::NiftiHeader::from_reader(std::io::Cursor::new(&good)).unwrap(),
        affine: [[0.0; 4]; 4],
        file_shape: shape,
        orientation: Orientation { perm: [0, 1, 2], flip: [false; 3] },
    };
    write_volume(&d.join("nan-voxels.nii"), &nan_hu, &g).unwrap();
    // An nnU-Net dataset inside the folder: its label map is not a CT.
    std::fs::create_dir_all(d.join("Dataset009_X/imagesTr")).unwrap();
    std::fs::create_dir_all(d.join("Dataset009_X/labelsTr")).unwrap();
    std::fs::write(d.join("Dataset009_X/dataset.json"), r#"{"labels": {"background": 0, "organ": 1}}"#).unwrap();
    std::fs::write(d.join("Dataset009_X/imagesTr/case_0000.nii.gz"), gzip(&good)).unwrap();
    std::fs::write(d.join("Dataset009_X/labelsTr/case.nii.gz"), b"a label map that would be refused if read").unwrap();

    let cache = d.join("cache");
    let bin = env!("CARGO_BIN_EXE_vox2vec");
    let out = Command::new(bin).args(["preprocess", "--skip-bad"]).arg(&d).arg("--cache").arg(&cache).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("panicked") && !text.contains("memory allocation"), "{text}");
    let total = 4 + bad.len() + 1;
    assert!(text.contains(&format!("{total} files: 4 usable (4 preprocessed now")), "{text}");
    for (name, _, why) in &bad {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("unusable {}", d.join(name).display())))
            .unwrap_or_else(|| panic!("{name} not reported:\n{text}"));
        assert!(line.contains(why), "{name}: expected {why:?} in {line:?}");
    }
    let line = text
        .lines()
        .find(|l| l.contains("unusable") && l.contains("nan-voxels.nii"))
        .unwrap_or_else(|| panic!("NaN file not refused:\n{text}"));
    assert!(line.contains("5 of") && line.contains("--nonfinite minimum"), "{line}");
    assert!(!text.contains("labelsTr"), "{text}");
    // The gap file and the plain one give the same cache content.
    let entry = |f: &str| {
        vox2vec::data::cache::load_entry(
            &cache.join(vox2vec::data::cache::cache_key(&d.join(f), &Default::default()).unwrap()),
        )
        .unwrap()
    };
    let (a, b, c) = (entry("good.nii"), entry("gap.nii"), entry("good-gz.nii.gz"));
    assert!(a.ct.hu == b.ct.hu && a.ct.hu == c.ct.hu && a.ct.body == b.ct.body && a.ct.shape == b.ct.shape);
    assert!(
        std::fs::read_dir(&cache).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.')),
        "temporary files left"
    );

    // --nonfinite minimum: the NaN file is now usable, reported with its count, and read as
    // the float file with those voxels at the image minimum.
    let out = Command::new(bin)
        .args(["preprocess", "--skip-bad", "--nonfinite", "minimum"])
        .arg(&d)
        .arg("--cache")
        .arg(&cache)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("5 usable")
            && text.contains(&format!("repaired {}: 5 NaN or infinite voxels", d.join("nan-voxels.nii").display())),
        "{text}"
    );
    let min = nan_hu.iter().copied().filter(|v| v.is_finite()).fold(f32::INFINITY, f32::min);
    let v = vox2vec::data::nifti_io::read_volume_with(
        &d.join("nan-voxels.nii"),
        vox2vec::data::nifti_io::NonFinitePolicy::ReplaceWithMinimum,
    )
    .unwrap();
    assert_eq!(v.replaced_nonfinite, 5);
    for (i, (&got, &want)) in v.data.iter().zip(&nan_hu).enumerate() {
        assert_eq!(got, if want.is_finite() { want } else { min }, "voxel {i}");
    }
    assert!(
        Command::new(bin).args(["preprocess", "--nonfinite", "zero"]).arg(&d).output().unwrap().status.code()
            == Some(2),
        "a bad policy must be a usage error"
    );
}

#[test]
fn checkpoints_record_how_they_were_made_and_embed_follows_them() {
    let d = tmpdir("recorded");
    let shape = [96, 80, 40];
    write_ct(&d.join("good.nii.gz"), &phantom_ct(1, shape, [1.0, 1.0, 2.0]), shape, [1.0, 1.0, 2.0]);
    let (train, tool) = (env!("CARGO_BIN_EXE_vox2vec-train"), env!("CARGO_BIN_EXE_vox2vec"));
    let run = d.join("run");
    let out = Command::new(train)
        .arg(&d)
        .arg("--cache")
        .arg(d.join("cache"))
        .arg("--out")
        .arg(&run)
        .args(TINY)
        .args(["--spacing", "1.5,1.5,2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ckpt = run.join("checkpoint.safetensors");
    let out = Command::new(tool).arg("inspect").arg(&ckpt).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for want in [
        "spacing_mm: [1.5,1.5,2.0]",
        "patch: [16,16,8]",
        "intensity_window_hu: [-1350.0,1000.0]",
        "command_line: ",
        "--spacing 1.5,1.5,2",
        "good.nii.gz",
        "\"volumes\":1",
        "train_config: ",
    ] {
        assert!(text.contains(want), "inspect lacks {want:?}:\n{text}");
    }
    // embed resamples as the backbone was trained...
    let feats = d.join("feats");
    let out = Command::new(tool)
        .arg("embed")
        .arg(d.join("good.nii.gz"))
        .arg("--weights")
        .arg(&ckpt)
        .arg("--out")
        .arg(&feats)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let geo: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(feats.join("geometry.json")).unwrap()).unwrap();
    assert_eq!(geo["spacing_mm"], serde_json::json!([1.5, 1.5, 2.0]));
    // ...and a contradicting flag is an error naming both values, no output left behind.
    let other = d.join("feats-other");
    let out = Command::new(tool)
        .arg("embed")
        .arg(d.join("good.nii.gz"))
        .arg("--weights")
        .arg(&ckpt)
        .arg("--out")
        .arg(&other)
        .args(["--spacing", "1,1,2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("--spacing 1,1,2")
            && err.contains("1.5,1.5,2")
            && err.contains("--override-recorded")
            && !other.exists(),
        "{err}"
    );
    let out = Command::new(tool)
        .arg("embed")
        .arg(d.join("good.nii.gz"))
        .arg("--weights")
        .arg(&ckpt)
        .arg("--out")
        .arg(&other)
        .args(["--spacing", "2,2,2", "--override-recorded"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Resuming with another spacing would mix two kinds of input: refused.
    let out = Command::new(train)
        .arg(&d)
        .arg("--cache")
        .arg(d.join("cache"))
        .arg("--out")
        .arg(&run)
        .args(TINY)
        .arg("--resume")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("spacing_mm"), "{err}");
}
