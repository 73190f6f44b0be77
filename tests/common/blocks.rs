//! A small synthetic nnU-Net raw dataset for segmentation tests: block CTs (a bright "bone"
//! block, label 1, inside a soft-tissue body), written with permuted and flipped file axes.

use std::path::{Path, PathBuf};

/// A CT with a bright "bone" block (label 1) inside a soft-tissue body, stored with the file
/// axes (z reversed, x, y reversed) as in tests/nifti.rs. `shift` moves the block.
pub fn write_case(image: &Path, label: &Path, shift: usize) {
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
                img[[a, b, c]] = if bone {
                    900
                } else if body {
                    40
                } else {
                    -1000
                };
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
    nifti::writer::WriterOptions::new(image)
        .reference_header(&h)
        .write_nifti_with_type(&img, nifti::NiftiType::Int16)
        .unwrap();
    nifti::writer::WriterOptions::new(label)
        .reference_header(&h)
        .write_nifti_with_type(&lab, nifti::NiftiType::Uint8)
        .unwrap();
}

/// An nnU-Net raw dataset of four block CTs (c0..c3).
pub fn blocks_dataset(d: &Path) -> PathBuf {
    let ds = d.join("Dataset900_Blocks");
    std::fs::create_dir_all(ds.join("imagesTr")).unwrap();
    std::fs::create_dir_all(ds.join("labelsTr")).unwrap();
    std::fs::write(ds.join("dataset.json"), r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "Bone": 1}, "numTraining": 4, "file_ending": ".nii.gz"}"#).unwrap();
    for (i, shift) in [0usize, 3, 6, 9].iter().enumerate() {
        write_case(&ds.join(format!("imagesTr/c{i}_0000.nii.gz")), &ds.join(format!("labelsTr/c{i}.nii.gz")), *shift);
    }
    ds
}
