//! Preprocessing on small made-up volumes: scipy-zoom semantics, body crop, body mask
//! (enclosed air is body, air reaching the outside is not, 26-connectivity), label alignment,
//! input discovery and the cache key.

use vox2vec::data::preprocess::{
    PreprocessConfig, body_bbox, body_mask, preprocess_ct, preprocess_labels, zoom_linear, zoom_nearest, zoomed_shape,
};

#[test]
fn zoom_follows_scipy() {
    // scipy.ndimage.zoom([0, 10], 1.5, order=1) == [0, 5, 10]: end points aligned.
    let z = zoom_linear(&[0.0, 10.0], [1, 1, 2], [1, 1, 3], -1.0);
    assert_eq!(z, vec![0.0, 5.0, 10.0]);
    // zoom([0, 1, 2, 3], 0.5) -> size 2: samples at 0 and 3.
    assert_eq!(zoom_linear(&[0.0, 1.0, 2.0, 3.0], [1, 1, 4], [1, 1, 2], 0.0), vec![0.0, 3.0]);
    // Sizes: round(size · old / new) with ties to even (Python's round).
    assert_eq!(zoomed_shape([5, 7, 10], [0.5, 0.5, 3.0], [1.0, 1.0, 2.0]), [2, 4, 15]);
    // Nearest: floor(coord + 0.5); [0, 1, 2] -> 5 samples at 0, .5, 1, 1.5, 2 -> 0, 1, 1, 2, 2.
    assert_eq!(zoom_nearest(&[0u8, 1, 2], [1, 1, 3], [1, 1, 5]), vec![0, 1, 1, 2, 2]);
    // Separable 3-D: a linear ramp stays a linear ramp.
    let shape = [3, 4, 5];
    let ramp: Vec<f32> = (0..60)
        .map(|i| {
            let (x, y, z) = (i / 20, (i / 5) % 4, i % 5);
            (x + 2 * y + 3 * z) as f32
        })
        .collect();
    let out = zoom_linear(&ramp, shape, [5, 7, 9], 0.0);
    let v = out[((4 * 7) + 6) * 9 + 8]; // last voxel = ramp's last value
    assert!((v - (2 + 6 + 12) as f32).abs() < 1e-4, "{v}");
}

/// A box of tissue with a sealed air cavity and a tunnel of air to the outside.
fn phantom_box() -> (Vec<f32>, [usize; 3]) {
    let s = [20, 20, 10];
    let mut v = vec![-1000.0f32; 4000];
    let at = |x: usize, y: usize, z: usize| (x * s[1] + y) * s[2] + z;
    for x in 4..16 {
        for y in 4..16 {
            for z in 2..8 {
                v[at(x, y, z)] = 40.0;
            }
        }
    }
    for x in 7..10 {
        for y in 7..10 {
            for z in 4..6 {
                v[at(x, y, z)] = -800.0; // sealed cavity ("lung")
            }
        }
    }
    for x in 4..13 {
        v[at(x, 13, 5)] = -900.0; // tunnel from the outside at x = 4
    }
    (v, s)
}

#[test]
fn body_mask_keeps_enclosed_air_and_drops_connected_air() {
    let (v, s) = phantom_box();
    let at = |x: usize, y: usize, z: usize| (x * s[1] + y) * s[2] + z;
    let m = body_mask(&v, s, -500.0);
    assert!(m[at(8, 8, 4)], "enclosed air must be body");
    assert!(!m[at(8, 13, 5)], "air connected to the outside must not be body");
    assert!(!m[at(0, 0, 0)] && !m[at(19, 19, 9)]);
    assert!(m[at(5, 5, 3)]);
    // 26-connectivity: a cavity touching outside air only through a corner is outside.
    let mut d = vec![40.0f32; 27];
    d[0] = -1000.0; // corner voxel touches the padded frame
    d[13] = -1000.0; // centre, diagonal to the corner
    let m = body_mask(&d, [3, 3, 3], -500.0);
    assert!(!m[13], "diagonal neighbour of outside air must be outside (26-connectivity)");
}

#[test]
fn preprocessing_crops_resamples_and_keeps_labels_aligned() {
    let (v, s) = phantom_box();
    assert_eq!(body_bbox(&v, s, -500.0), Some([[4, 16], [4, 16], [2, 8]]));
    let cfg = PreprocessConfig::default();
    let ct = preprocess_ct(&v, s, [2.0, 2.0, 2.0], &cfg).unwrap();
    assert_eq!(ct.shape, [24, 24, 6]);
    assert!(ct.hu.iter().all(|&h| (-1000..=40).contains(&h)));
    // A label on the cavity stays on the (resampled) cavity.
    let labels: Vec<u8> = v.iter().map(|&h| (h == -800.0) as u8).collect();
    let pl = preprocess_labels(&labels, &ct).unwrap();
    let on: Vec<i16> = pl.iter().zip(&ct.hu).filter(|(l, _)| **l == 1).map(|(_, &h)| h).collect();
    assert!(!on.is_empty());
    assert!(on.iter().filter(|&&h| h < -500).count() as f64 > 0.6 * on.len() as f64, "label moved off its cavity");
    // No body at all is a clear error.
    let air = vec![-1000.0f32; 1000];
    let e = preprocess_ct(&air, [10, 10, 10], [1.0, 1.0, 1.0], &cfg).unwrap_err();
    assert!(e.to_string().contains("no body"), "{e}");
}

#[test]
fn absurd_voxel_sizes_are_refused_before_allocating() {
    use vox2vec::data::preprocess::checked_zoomed_shape;
    let cfg = PreprocessConfig::default();
    let shape = [16usize, 16, 8];
    let hu = vec![0.0f32; shape.iter().product()];
    // A voxel size of metres (a damaged pixdim) asks for a grid of terabytes: an error, no abort.
    for spacing in
        [[1e30, 1.0, 1.0], [300.0, 300.0, 300.0], [f64::INFINITY, 1.0, 1.0], [0.0, 1.0, 1.0], [f64::NAN, 1.0, 1.0]]
    {
        let e = format!("{:#}", preprocess_ct(&hu, shape, spacing, &cfg).unwrap_err());
        assert!(e.contains("limit") || e.contains("positive"), "{spacing:?}: {e}");
    }
    // 20 mm isotropic on a 128^3 volume: each axis under the per-axis limit, the grid not.
    let e = format!("{:#}", checked_zoomed_shape([128, 128, 128], [20.0, 20.0, 20.0], [1.0, 1.0, 2.0]).unwrap_err());
    assert!(e.contains("voxels, more than the limit"), "{e}");
    // A real CT's grid passes.
    assert_eq!(
        checked_zoomed_shape([512, 512, 300], [0.8, 0.8, 2.5], [1.0, 1.0, 2.0]).unwrap(),
        zoomed_shape([512, 512, 300], [0.8, 0.8, 2.5], [1.0, 1.0, 2.0])
    );
}
