//! What every accepted CT volume must be, whichever reader took it (the nifti and dicom
//! targets): coherent data and geometry, and for small volumes a preprocessing that either
//! refuses or gives a coherent result.

use vox2vec::data::nifti_io::Volume;
use vox2vec::data::preprocess::{PreprocessConfig, checked_zoomed_shape, preprocess_ct};

/// Preprocess only volumes whose resampled grid has at most `max_preprocess_voxels`: the
/// limits themselves are checked by `checked_zoomed_shape` on every input; running the zoom
/// on a large grid would only make the fuzzer slow.
pub fn check_accepted(vol: &Volume, max_preprocess_voxels: usize) {
    let n: usize = vol.shape.iter().product();
    assert_eq!(vol.data.len(), n, "data length {} for shape {:?}", vol.data.len(), vol.shape);
    assert!(vol.data.iter().all(|v| v.is_finite()), "accepted a non-finite voxel");
    assert!(vol.spacing.iter().all(|s| s.is_finite() && *s > 0.0), "spacing {:?}", vol.spacing);
    assert!(vol.geometry.affine.iter().flatten().all(|v| v.is_finite()));
    let mut fs = vol.geometry.file_shape;
    fs.sort();
    let mut cs = vol.shape;
    cs.sort();
    assert_eq!(
        fs, cs,
        "canonical shape {:?} is not a permutation of the file's {:?}",
        vol.shape, vol.geometry.file_shape
    );
    let cfg = PreprocessConfig::default();
    let Ok(grid) = checked_zoomed_shape(vol.shape, vol.spacing, cfg.spacing) else { return };
    if n > max_preprocess_voxels || grid.iter().product::<usize>() > max_preprocess_voxels {
        return;
    }
    if let Ok(ct) = preprocess_ct(&vol.data, vol.shape, vol.spacing, &cfg) {
        let m: usize = ct.shape.iter().product();
        assert_eq!(ct.hu.len(), m);
        assert!(
            !ct.body.is_empty() && ct.body.windows(2).all(|w| w[0] < w[1]) && (*ct.body.last().unwrap() as usize) < m
        );
        for a in 0..3 {
            let [lo, hi] = ct.crop_box[a];
            assert!(lo < hi && hi <= vol.shape[a], "crop box {:?} outside {:?}", ct.crop_box, vol.shape);
        }
    }
}
