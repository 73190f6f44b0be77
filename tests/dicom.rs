//! DICOM series in (tests/data/dicom, written by pydicom from a crop of a shared CT with
//! dev/make-dicom-fixtures.py): a series reads back to the same voxels and world geometry
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
    for (d, want) in
        [("missing_slice", "1 slice(s) missing"), ("two_series", "2 CT series in one folder"), ("mr", "no CT series")]
    {
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
    let cfg = ModelConfig {
        fpn: FpnConfig { in_channels: 1, base_channels: 2, num_scales: 3 },
        proj_dim: 4,
        temperature: 0.1,
    };
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

/// A copy of the test series with `edit` applied to the slices `which` picks (by sorted file
/// name index), in a fresh folder; returns the folder and the edited files' names.
fn damaged_copy(
    name: &str,
    which: impl Fn(usize) -> bool,
    edit: impl Fn(&mut dicom_object::DefaultDicomObject),
) -> (PathBuf, Vec<String>) {
    let dir = tmpdir(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(data("series")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut edited = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let to = dir.join(f.file_name().unwrap());
        if which(i) {
            let mut obj = dicom_object::open_file(f).unwrap();
            edit(&mut obj);
            obj.write_to_file(&to).unwrap();
            edited.push(f.file_name().unwrap().to_string_lossy().into_owned());
        } else {
            std::fs::copy(f, &to).unwrap();
        }
    }
    (dir, edited)
}

fn put_str(obj: &mut dicom_object::DefaultDicomObject, tag: dicom_object::Tag, vr: dicom_core::VR, v: &str) {
    obj.put(dicom_core::DataElement::new(tag, vr, dicom_core::PrimitiveValue::from(v)));
}

fn put_u16(obj: &mut dicom_object::DefaultDicomObject, tag: dicom_object::Tag, v: u16) {
    obj.put(dicom_core::DataElement::new(tag, dicom_core::VR::US, dicom_core::PrimitiveValue::from(v)));
}

/// Damage that a reader could take silently (each a misread) is refused, naming the file and
/// the tag: an absurd RescaleSlope in one slice or in all, BitsAllocated that does not match
/// the pixel data, a colour photometric interpretation on a single-sample slice, and the rest
/// of the pixel module's rules (MONOCHROME1, HighBit, PixelRepresentation, NumberOfFrames,
/// SamplesPerPixel, a RescaleIntercept far out, a slope that pushes voxels out of int16 HU).
#[test]
fn a_damaged_pixel_module_is_refused_naming_the_file_and_the_tag() {
    use dicom_core::VR;
    use dicom_dictionary_std::tags;
    type Edit = Box<dyn Fn(&mut dicom_object::DefaultDicomObject)>;
    let cases: Vec<(&str, bool, Edit, &str)> = vec![
        ("slope_one", false, Box::new(|o| put_str(o, tags::RESCALE_SLOPE, VR::DS, "1e30")), "RescaleSlope 1"),
        ("slope_all", true, Box::new(|o| put_str(o, tags::RESCALE_SLOPE, VR::DS, "1e30")), "RescaleSlope 1"),
        ("slope_range", false, Box::new(|o| put_str(o, tags::RESCALE_SLOPE, VR::DS, "900")), "outside [-32768, 32767]"),
        ("intercept", false, Box::new(|o| put_str(o, tags::RESCALE_INTERCEPT, VR::DS, "-1e9")), "RescaleIntercept"),
        (
            "bits8",
            false,
            Box::new(|o| {
                put_u16(o, tags::BITS_ALLOCATED, 8);
                put_u16(o, tags::BITS_STORED, 8);
                put_u16(o, tags::HIGH_BIT, 7);
            }),
            "PixelData holds",
        ),
        (
            "rgb",
            false,
            Box::new(|o| put_str(o, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB")),
            "PhotometricInterpretation RGB",
        ),
        (
            "monochrome1",
            false,
            Box::new(|o| put_str(o, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME1")),
            "MONOCHROME1",
        ),
        ("samples", false, Box::new(|o| put_u16(o, tags::SAMPLES_PER_PIXEL, 3)), "SamplesPerPixel 3"),
        ("high_bit", false, Box::new(|o| put_u16(o, tags::HIGH_BIT, 3)), "HighBit 3"),
        ("representation", false, Box::new(|o| put_u16(o, tags::PIXEL_REPRESENTATION, 2)), "PixelRepresentation 2"),
        ("frames", false, Box::new(|o| put_str(o, tags::NUMBER_OF_FRAMES, VR::IS, "2")), "NumberOfFrames 2"),
        (
            "no_bits",
            false,
            Box::new(|o| {
                o.remove_element(tags::BITS_STORED);
            }),
            "no BitsStored",
        ),
    ];
    for (name, all, edit, want) in cases {
        let (dir, edited) = damaged_copy(name, |i| all || i == 3, edit);
        let e = format!("{:#}", read_volume(&dir).expect_err(name));
        assert!(e.contains(want), "{name}: {e}");
        assert!(
            edited.iter().any(|f| e.contains(f.as_str())),
            "{name}: the message names none of the edited files {edited:?}: {e}"
        );
    }
    // The checks pass the untouched series, and a slope and intercept a scanner might write.
    let (dir, _) = damaged_copy(
        "plausible",
        |i| i == 3,
        |o| {
            put_str(o, tags::RESCALE_SLOPE, VR::DS, "1");
            put_str(o, tags::RESCALE_INTERCEPT, VR::DS, "-1024");
        },
    );
    read_volume(&dir).unwrap();
}
