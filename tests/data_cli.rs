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
    let g = Geometry { header, affine: [[0.0; 4]; 4], file_shape: shape, orientation: Orientation { perm: [0, 1, 2], flip: [false; 3] } };
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

const TINY: &[&str] = &["--base-channels", "4", "--num-scales", "3", "--proj-dim", "16", "--pairs", "2", "--patch", "16,16,8", "--voxels", "16", "--steps", "2"];

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
    assert!(discover(&tmpdir("empty")).unwrap_err().to_string().contains("no NIfTI"));
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
    let out = Command::new(bin).arg(&d).arg("--cache").arg(d.join("cache")).arg("--out").arg(&out_dir).args(TINY).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("unusable") && err.contains("corrupt.nii.gz") && err.contains("--skip-bad"), "{err}");
    assert!(!out_dir.join("checkpoint.safetensors").exists());
    let out = Command::new(bin).arg(&d).arg("--skip-bad").arg("--cache").arg(d.join("cache")).arg("--out").arg(&out_dir).args(TINY).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1 usable") && err.contains("3 unusable") && err.contains("smaller than the patch"), "{err}");
    assert!(out_dir.join("checkpoint.safetensors").is_file() && out_dir.join("loss.png").is_file());
    // Nothing usable: non-zero exit.
    let bad = tmpdir("allbad");
    std::fs::write(bad.join("x.nii"), b"nope").unwrap();
    let out = Command::new(bin).arg(&bad).arg("--skip-bad").arg("--cache").arg(bad.join("cache")).arg("--out").arg(bad.join("run")).args(TINY).output().unwrap();
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
