//! DICOM series in (tests/data/dicom, written by pydicom from a crop of a shared CT with
//! scripts/make-dicom-fixtures.py): a series reads back to the same voxels and world geometry
//! as the crop's NIfTI, whatever its file names' order, compressed (RLE) or not, beside a
//! localizer, through a DICOMDIR; a missing slice, two CT series in one folder and a non-CT
//! modality are refused with messages naming the problem; `embed` takes a series folder as it
//! takes a NIfTI.

use std::path::{Path, PathBuf};

use vox2vec::data::nifti_io::{Volume, read_volume};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom").join(name)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-dicom-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assert_same(a: &Volume, b: &Volume, what: &str) {
    assert_eq!(a.shape, b.shape, "{what}: canonical shape");
    assert_eq!(a.data, b.data, "{what}: voxels (HU)");
    for (x, y) in a.spacing.iter().zip(&b.spacing) {
        assert!((x - y).abs() < 1e-4, "{what}: spacing {:?} vs {:?}", a.spacing, b.spacing);
    }
    let (ca, cb) = (a.geometry.canonical_affine(), b.geometry.canonical_affine());
    for r in 0..4 {
        for c in 0..4 {
            assert!((ca[r][c] - cb[r][c]).abs() < 2e-3, "{what}: world affine {ca:?} vs {cb:?}");
        }
    }
}

#[test]
fn a_series_reads_back_to_the_same_voxels_and_world() {
    let expected = read_volume(&data("expected.nii.gz")).unwrap();
    assert_eq!(expected.shape, [48, 40, 10]);
    for d in ["series", "rle", "with_localizer"] {
        let v = read_volume(&data(d)).unwrap_or_else(|e| panic!("{d}: {e:#}"));
        assert_same(&v, &expected, d);
    }
    // The file names are random: their order is not the slice order, and a reversed copy
    // reads the same.
    let dir = tmpdir("renamed");
    let mut files: Vec<PathBuf> = std::fs::read_dir(data("series")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for (i, f) in files.iter().enumerate() {
        std::fs::copy(f, dir.join(format!("{:03}", files.len() - i))).unwrap();
    }
    assert_same(&read_volume(&dir).unwrap(), &expected, "renamed");
    // A DICOMDIR stands for its folder.
    std::fs::write(dir.join("DICOMDIR"), b"").unwrap();
    assert_same(&read_volume(&dir.join("DICOMDIR")).unwrap(), &expected, "DICOMDIR");
}

#[test]
fn bad_series_are_refused_with_the_reason() {
    for (d, want) in [("missing_slice", "1 slice(s) missing"), ("two_series", "2 CT series in one folder"), ("mr", "no CT series")] {
        let e = format!("{:#}", read_volume(&data(d)).unwrap_err());
        assert!(e.contains(want) && e.contains(d), "{d}: {e}");
    }
    let e = format!("{:#}", read_volume(&data("mr")).unwrap_err());
    assert!(e.contains("MR"), "{e}");
    // Two slices at one position.
    let dir = tmpdir("duplicate");
    let f = std::fs::read_dir(data("series")).unwrap().next().unwrap().unwrap().path();
    for g in std::fs::read_dir(data("series")).unwrap() {
        let g = g.unwrap().path();
        std::fs::copy(&g, dir.join(g.file_name().unwrap())).unwrap();
    }
    std::fs::copy(&f, dir.join("copy.dcm")).unwrap();
    let e = format!("{:#}", read_volume(&dir).unwrap_err());
    assert!(e.contains("duplicate") && e.contains("copy.dcm"), "{e}");
}

/// `embed` on a series folder gives what it gives on the same CT as NIfTI, bit for bit.
#[test]
fn embed_takes_a_series_folder_as_a_ct() {
    use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};
    let dir = tmpdir("embed");
    let cfg = ModelConfig { fpn: FpnConfig { in_channels: 1, base_channels: 2, num_scales: 3 }, proj_dim: 4, temperature: 0.1 };
    let m = Vox2Vec::new(cfg, 3);
    let w = dir.join("w.safetensors");
    vox2vec::checkpoint::save(&w, &m.config, &m.store, None, &[]).unwrap();
    let run = |input: PathBuf, out: &Path| {
        let res = std::process::Command::new(env!("CARGO_BIN_EXE_vox2vec"))
            .arg("embed")
            .arg(&input)
            .arg("--weights")
            .arg(&w)
            .arg("--out")
            .arg(out)
            .args(["--spacing", "6,6,6", "--patch", "16,16,8", "--device", "cpu", "--levels", "0,1"])
            .output()
            .unwrap();
        assert!(res.status.success(), "{}: {}", input.display(), String::from_utf8_lossy(&res.stderr));
    };
    run(data("series"), &dir.join("a"));
    run(data("expected.nii.gz"), &dir.join("b"));
    for f in ["level_0.npy", "level_1.npy"] {
        assert!(std::fs::read(dir.join("a").join(f)).unwrap() == std::fs::read(dir.join("b").join(f)).unwrap(), "{f}");
    }
}
