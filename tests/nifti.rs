//! NIfTI reading and writing: canonical orientation for flipped and permuted axes, the
//! affine sources (sform, qform, pixdim), data types, scaling (NaN slope), 4-D, oblique and
//! corrupt files, and the round trip back onto the file grid. Files are made here, in
//! temporary folders.

use std::path::{Path, PathBuf};

use nifti::{NiftiHeader, NiftiObject, NiftiType, ReaderOptions};
use vox2vec::data::nifti_io::{read_volume, write_volume};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-nifti-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Header with an sform (code 1) equal to `affine` rows.
fn header_with_sform(affine: [[f32; 4]; 3]) -> NiftiHeader {
    NiftiHeader {
        sform_code: 1,
        qform_code: 0,
        srow_x: affine[0],
        srow_y: affine[1],
        srow_z: affine[2],
        pixdim: [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
        ..NiftiHeader::default()
    }
}

fn write_file<T: nifti::DataElement + bytemuck::Pod + Copy>(
    path: &Path,
    data: &ndarray::ArrayD<T>,
    h: &NiftiHeader,
    ty: NiftiType,
) {
    nifti::writer::WriterOptions::new(path).reference_header(h).write_nifti_with_type(data, ty).unwrap();
}

/// Canonical test volume: value = 100·x + 10·y + z.
fn canonical_value(x: usize, y: usize, z: usize) -> f32 {
    (100 * x + 10 * y + z) as f32
}

#[test]
fn flipped_and_permuted_axes_become_canonical_and_round_trip() {
    let dir = tmpdir("orient");
    let shape = [4usize, 5, 6]; // canonical X, Y, Z
    let spacing = [1.5f32, 2.0, 3.0];
    // File axis 0 = world z (decreasing), file axis 1 = world x (increasing), file axis 2 = world y (decreasing).
    let file_shape = [shape[2], shape[0], shape[1]];
    let mut arr = ndarray::ArrayD::<i16>::zeros(ndarray::IxDyn(&file_shape));
    for a in 0..file_shape[0] {
        for b in 0..file_shape[1] {
            for c in 0..file_shape[2] {
                let (x, y, z) = (b, shape[1] - 1 - c, shape[2] - 1 - a);
                arr[[a, b, c]] = canonical_value(x, y, z) as i16;
            }
        }
    }
    let affine = [[0.0, spacing[0], 0.0, -10.0], [0.0, 0.0, -spacing[1], 20.0], [-spacing[2], 0.0, 0.0, 30.0]];
    for name in ["perm.nii", "perm.nii.gz"] {
        let path = dir.join(name);
        write_file(&path, &arr, &header_with_sform(affine), NiftiType::Int16);
        let v = read_volume(&path).unwrap();
        assert_eq!(v.shape, shape, "{name}");
        for (s, e) in v.spacing.iter().zip(spacing) {
            assert!((s - e as f64).abs() < 1e-6, "{name}: spacing {:?}", v.spacing);
        }
        let mut i = 0;
        for x in 0..shape[0] {
            for y in 0..shape[1] {
                for z in 0..shape[2] {
                    assert_eq!(v.data[i], canonical_value(x, y, z), "{name} at ({x}, {y}, {z})");
                    i += 1;
                }
            }
        }
        // The canonical affine is diagonal with positive spacing and maps voxel 0 to the
        // world minimum corner.
        let ca = v.geometry.canonical_affine();
        for r in 0..3 {
            for c in 0..3 {
                let want = if r == c { spacing[r] as f64 } else { 0.0 };
                assert!((ca[r][c] - want).abs() < 1e-5, "canonical affine {ca:?}");
            }
        }
        // Writing the canonical array back reproduces the file's array and affine exactly.
        let back = dir.join(format!("back_{name}"));
        let as_i16: Vec<i16> = v.data.iter().map(|&f| f as i16).collect();
        write_volume(&back, &as_i16, &v.geometry).unwrap();
        let orig = ReaderOptions::new().read_file(&path).unwrap();
        let again = ReaderOptions::new().read_file(&back).unwrap();
        assert_eq!(orig.volume().raw_data(), again.volume().raw_data(), "{name}: voxel order changed");
        assert_eq!(orig.header().srow_x, again.header().srow_x);
        assert_eq!(orig.header().srow_y, again.header().srow_y);
        assert_eq!(orig.header().srow_z, again.header().srow_z);
    }
}

#[test]
fn scaling_and_data_types() {
    let dir = tmpdir("types");
    let affine = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]];
    let h = header_with_sform(affine);
    let vals: Vec<i32> = (0..24).map(|i| i * 1000 - 7000).collect();
    let arr = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3, 4]), vals.clone()).unwrap();
    let p = dir.join("int32.nii.gz");
    write_file(&p, &arr, &h, NiftiType::Int32);
    let v = read_volume(&p).unwrap();
    let mut sorted = v.data.clone();
    sorted.sort_by(f32::total_cmp);
    assert_eq!(sorted, vals.iter().map(|&x| x as f32).collect::<Vec<_>>());

    let arr =
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3, 4]), (0..24).map(|i| i as f64 * 0.5 - 3.0).collect())
            .unwrap();
    let p = dir.join("f64.nii");
    write_file(&p, &arr, &h, NiftiType::Float64);
    assert!((read_volume(&p).unwrap().data[23] - 8.5).abs() < 1e-6);

    let arr = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3, 4]), (0..24u8).collect()).unwrap();
    let p = dir.join("u8.nii");
    write_file(&p, &arr, &h, NiftiType::Uint8);
    assert_eq!(read_volume(&p).unwrap().data.iter().sum::<f32>(), (0..24).sum::<i32>() as f32);

    // Scaling: the header bytes of an uncompressed file are patched (scl_slope at 112,
    // scl_inter at 116); the writer itself always stores 1 / 0.
    let arr = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3, 4]), (0..24i16).collect()).unwrap();
    let p = dir.join("scaled.nii");
    write_file(&p, &arr, &h, NiftiType::Int16);
    let patch = |slope: f32, inter: f32| {
        let mut b = std::fs::read(&p).unwrap();
        b[112..116].copy_from_slice(&slope.to_le_bytes());
        b[116..120].copy_from_slice(&inter.to_le_bytes());
        std::fs::write(&p, b).unwrap();
    };
    patch(2.0, -1024.0);
    let v = read_volume(&p).unwrap();
    assert_eq!(v.data.iter().cloned().fold(f32::INFINITY, f32::min), -1024.0);
    assert_eq!(v.data.iter().cloned().fold(f32::NEG_INFINITY, f32::max), -1024.0 + 46.0);
    patch(f32::NAN, 5.0);
    let v = read_volume(&p).unwrap();
    assert!(v.data.iter().all(|x| x.is_finite()), "a NaN slope must mean no scaling");
    assert_eq!(v.data.iter().cloned().fold(f32::NEG_INFINITY, f32::max), 23.0);
    patch(0.0, 5.0);
    assert_eq!(read_volume(&p).unwrap().data.iter().cloned().fold(f32::NEG_INFINITY, f32::max), 23.0);
}

#[test]
fn qform_and_pixdim_affines() {
    let dir = tmpdir("qform");
    let arr = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[3, 2, 2]), (0..12i16).collect()).unwrap();
    // qform: 180° about z (quaternion b = c = 0, d = 1) flips x and y.
    let h = NiftiHeader {
        sform_code: 0,
        qform_code: 1,
        quatern_b: 0.0,
        quatern_c: 0.0,
        quatern_d: 1.0,
        pixdim: [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0],
        ..NiftiHeader::default()
    };
    let p = dir.join("q.nii");
    write_file(&p, &arr, &h, NiftiType::Int16);
    let v = read_volume(&p).unwrap();
    assert_eq!(v.geometry.orientation.flip, [true, true, false]);
    assert_eq!(v.spacing, [2.0, 3.0, 4.0]);
    // Canonical (0, 0, 0) is file voxel (2, 1, 0), which holds arr[[2, 1, 0]] = 2·4 + 1·2.
    assert_eq!(v.data[0], 10.0);
    // Neither form: pixdim.
    let h = NiftiHeader {
        sform_code: 0,
        qform_code: 0,
        pixdim: [1.0, 0.5, 0.7, 2.5, 0.0, 0.0, 0.0, 0.0],
        ..NiftiHeader::default()
    };
    let p = dir.join("pixdim.nii.gz");
    write_file(&p, &arr, &h, NiftiType::Int16);
    let v = read_volume(&p).unwrap();
    assert_eq!(v.geometry.orientation.flip, [false, false, false]);
    assert!((v.spacing[2] - 2.5).abs() < 1e-6);
}

#[test]
fn four_d_oblique_and_corrupt_files() {
    let dir = tmpdir("bad");
    let h = header_with_sform([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]);
    let one = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 2, 2, 1]), (0..8i16).collect()).unwrap();
    let p = dir.join("4d1.nii.gz");
    write_file(&p, &one, &h, NiftiType::Int16);
    assert_eq!(read_volume(&p).unwrap().shape, [2, 2, 2]);
    let two = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 2, 2, 2]), (0..16i16).collect()).unwrap();
    let p = dir.join("4d2.nii.gz");
    write_file(&p, &two, &h, NiftiType::Int16);
    let e = format!("{:#}", read_volume(&p).unwrap_err());
    assert!(e.contains("4d2.nii.gz") && e.contains("volumes"), "{e}");

    let c = 10f32.to_radians().cos();
    let s = 10f32.to_radians().sin();
    let ob = header_with_sform([[c, -s, 0.0, 0.0], [s, c, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]);
    let arr = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 2, 2]), (0..8i16).collect()).unwrap();
    let p = dir.join("oblique.nii");
    write_file(&p, &arr, &ob, NiftiType::Int16);
    let e = format!("{:#}", read_volume(&p).unwrap_err());
    assert!(e.contains("oblique.nii") && e.contains("oblique"), "{e}");

    let p = dir.join("garbage.nii.gz");
    std::fs::write(&p, b"not a nifti file at all").unwrap();
    assert!(format!("{:#}", read_volume(&p).unwrap_err()).contains("garbage.nii.gz"));
    let good = dir.join("good.nii");
    write_file(&good, &arr, &h, NiftiType::Int16);
    let bytes = std::fs::read(&good).unwrap();
    let p = dir.join("truncated.nii");
    std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
    assert!(format!("{:#}", read_volume(&p).unwrap_err()).contains("truncated.nii"));
    assert!(format!("{:#}", read_volume(&dir.join("absent.nii.gz")).unwrap_err()).contains("absent.nii.gz"));
}

/// A small float32 .nii (sform with spacing 1, 2, 3) and its canonical values.
fn small_float_file(dir: &Path, name: &str, values: &[f32]) -> PathBuf {
    let arr = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[3, 4, 5]), values.to_vec()).unwrap();
    let h = header_with_sform([[1.0, 0.0, 0.0, -5.0], [0.0, 2.0, 0.0, 7.0], [0.0, 0.0, 3.0, 11.0]]);
    let p = dir.join(name);
    write_file(&p, &arr, &h, NiftiType::Float32);
    p
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn refused(p: &Path, what: &str) -> String {
    let e = format!("{:#}", read_volume(p).expect_err(&format!("{} must be refused ({what})", p.display())));
    assert!(e.contains(&p.file_name().unwrap().to_string_lossy().to_string()), "the error must name the file: {e}");
    e
}

#[test]
fn damaged_gzip_streams_are_refused_and_multi_member_files_read() {
    let dir = tmpdir("gzip");
    let values: Vec<f32> = (0..60).map(|i| i as f32 * 7.0 - 100.0).collect();
    let plain = small_float_file(&dir, "plain.nii", &values);
    let bytes = std::fs::read(&plain).unwrap();
    let want = read_volume(&plain).unwrap().data;
    let gz = gzip(&bytes);
    let ok = dir.join("ok.nii.gz");
    std::fs::write(&ok, &gz).unwrap();
    assert_eq!(read_volume(&ok).unwrap().data, want);
    // Two gzip members (as bgzip and `cat a.gz b.gz` make) are one stream.
    let two = dir.join("two.nii.gz");
    std::fs::write(&two, [gzip(&bytes[..200]), gzip(&bytes[200..])].concat()).unwrap();
    assert_eq!(read_volume(&two).unwrap().data, want);
    let n = gz.len();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut bad_crc = gz.clone();
    bad_crc[n - 8] ^= 0x01;
    cases.push(("crc", bad_crc));
    let mut bad_isize = gz.clone();
    bad_isize[n - 4] ^= 0x01;
    cases.push(("isize", bad_isize));
    cases.push(("cut-trailer", gz[..n - 4].to_vec()));
    cases.push(("cut-body", gz[..n / 2].to_vec()));
    cases.push(("trailing-garbage", [gz.clone(), b"garbage".to_vec()].concat()));
    for (i, (name, data)) in cases.into_iter().enumerate() {
        let p = dir.join(format!("bad-{name}.nii.gz"));
        std::fs::write(&p, data).unwrap();
        let e = refused(&p, name);
        assert!(e.contains("gzip") || e.contains("truncated"), "case {i} {name}: {e}");
    }
    // Every single-byte flip of the compressed body either fails or decodes exactly.
    let mut silently_wrong = 0;
    for at in (10..n - 8).step_by(3) {
        let mut d = gz.clone();
        d[at] ^= 0x10;
        let p = dir.join("flip.nii.gz");
        std::fs::write(&p, d).unwrap();
        if let Ok(v) = read_volume(&p)
            && v.data != want
        {
            silently_wrong += 1;
        }
    }
    assert_eq!(silently_wrong, 0, "byte flips in the gzip body decoded to wrong voxels without an error");
}

#[test]
fn vox_offset_is_honoured_and_checked() {
    let dir = tmpdir("voxoffset");
    let values: Vec<f32> = (0..60).map(|i| i as f32).collect();
    let plain = small_float_file(&dir, "plain.nii", &values);
    let bytes = std::fs::read(&plain).unwrap();
    let want = read_volume(&plain).unwrap().data;
    let with_offset = |off: f32, pad: usize| -> Vec<u8> {
        let mut h = bytes[..352].to_vec();
        h[108..112].copy_from_slice(&off.to_le_bytes());
        [h, vec![0u8; pad], bytes[352..].to_vec()].concat()
    };
    // Data at byte 1024 (extension flag 0, padding before the voxels): read from 1024.
    let p = dir.join("offset1024.nii");
    std::fs::write(&p, with_offset(1024.0, 1024 - 352)).unwrap();
    assert_eq!(read_volume(&p).unwrap().data, want, "vox_offset 1024 must be honoured");
    let gzp = dir.join("offset1024.nii.gz");
    std::fs::write(&gzp, gzip(&with_offset(1024.0, 1024 - 352))).unwrap();
    assert_eq!(read_volume(&gzp).unwrap().data, want);
    for (name, off) in [("below-header", 100.0f32), ("past-end", 1e9), ("nan", f32::NAN), ("fraction", 352.5)] {
        let p = dir.join(format!("offset-{name}.nii"));
        std::fs::write(&p, with_offset(off, 0)).unwrap();
        let e = refused(&p, name);
        assert!(e.contains("vox_offset"), "{name}: {e}");
    }
    // Offset right but too few voxel bytes after it.
    let p = dir.join("offset-short.nii");
    std::fs::write(&p, with_offset(400.0, 0)).unwrap();
    assert!(refused(&p, "short").contains("truncated"));
}

#[test]
fn non_finite_voxels_and_affines_are_refused() {
    let dir = tmpdir("nonfinite");
    let mut values: Vec<f32> = (0..60).map(|i| i as f32).collect();
    values[17] = f32::NAN;
    values[40] = f32::INFINITY;
    let p = small_float_file(&dir, "nan-voxels.nii", &values);
    let e = refused(&p, "NaN voxels");
    assert!(e.contains("2 of 60 voxels"), "{e}");
    let values: Vec<f32> = (0..60).map(|i| i as f32).collect();
    let p = small_float_file(&dir, "good.nii", &values);
    let bytes = std::fs::read(&p).unwrap();
    // srow_x[3] (x translation) at byte 292, srow_z[2] (z voxel size) at byte 320.
    for (name, at, v) in
        [("nan-translation", 292usize, f32::NAN), ("inf-translation", 292, f32::INFINITY), ("nan-size", 320, f32::NAN)]
    {
        let mut b = bytes.clone();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let q = dir.join(format!("{name}.nii"));
        std::fs::write(&q, b).unwrap();
        let e = refused(&q, name);
        assert!(e.contains("non-finite"), "{name}: {e}");
    }
}
