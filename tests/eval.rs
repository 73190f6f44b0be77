//! Dice on known masks; the sliding-window stitching writes every voxel exactly once and
//! reproduces the reference's overwrite order; .npy round trip.

use vox2vec::eval::dice::{dice, dice_per_class};
use vox2vec::eval::npy;
use vox2vec::eval::sliding::{Plan, overlap_of, plan_axis};

#[test]
fn dice_on_known_masks() {
    let a = [true, true, false, false];
    assert!((dice(&a, &a) - 1.0).abs() < 1e-12);
    assert!((dice(&a, &[true, false, true, false]) - 0.5).abs() < 1e-5);
    assert!(dice(&a, &[false, false, true, true]) < 1e-5);
    assert!((dice(&[false; 4], &[false; 4]) - 1.0).abs() < 1e-12, "both empty");
    let d = dice_per_class(&[0, 1, 1, 2, 2, 2], &[0, 1, 2, 2, 2, 0], 2);
    assert!((d[0] - 2.0 / 3.0).abs() < 1e-5 && (d[1] - 4.0 / 6.0).abs() < 1e-5, "{d:?}");
}

/// The reference's loop: each box overwrites its (trimmed) region; returns the last box per voxel.
fn reference_last_writer(size: usize, patch: usize) -> Vec<usize> {
    let o = overlap_of(patch);
    let stride = patch - o;
    let n = 1 + (size - patch).div_ceil(stride);
    let mut w = vec![usize::MAX; size];
    for k in 0..n {
        let stop = (k * stride + patch).min(size);
        let start = stop - patch;
        let lo = if start > 0 { start + o / 2 } else { 0 };
        let hi = if stop < size { stop - o / 2 } else { size };
        for v in w.iter_mut().take(hi).skip(lo) {
            *v = k;
        }
    }
    w
}

#[test]
fn stitching_writes_every_voxel_once_like_the_reference() {
    for (size, patch) in [(128, 128), (129, 128), (200, 128), (300, 128), (32, 32), (33, 32), (95, 32), (97, 31)] {
        let p = plan_axis(size, patch);
        assert_eq!(p.owner, reference_last_writer(size, patch), "size {size} patch {patch}");
    }
    // 3-D, all pyramid levels: each output voxel is written by exactly one box.
    let (size, patch) = ([150, 131, 70], [128, 128, 32]);
    let plan = Plan::new(size, patch);
    for level in 0..6u32 {
        let f = 1usize << level;
        let out_shape = [size[0].div_ceil(f), size[1].div_ceil(f), size[2].div_ceil(f)];
        let ps = [patch[0] / f, patch[1] / f, patch[2] / f];
        let mut count = vec![0.0f32; out_shape.iter().product()];
        for (which, start) in plan.boxes() {
            // Stitch a patch of ones into a zero buffer and add it up.
            let mut once = vec![0.0f32; count.len()];
            plan.stitch(which, start, level, &vec![1.0; ps.iter().product()], ps, &mut once, out_shape, 1);
            for (c, o) in count.iter_mut().zip(&once) {
                *c += o;
            }
        }
        assert!(
            count.iter().all(|&c| c == 1.0),
            "level {level}: some voxel written {} or {} times",
            count.iter().cloned().fold(f32::INFINITY, f32::min),
            count.iter().cloned().fold(0.0, f32::max)
        );
    }
}

#[test]
fn npy_round_trip() {
    let dir = std::env::temp_dir().join(format!("vox2vec-npy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("a.npy");
    let v: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 1.0).collect();
    npy::write_f32(&p, &[2, 3, 4], &v).unwrap();
    let (s, r) = npy::read_f32(&p).unwrap();
    assert_eq!(s, vec![2, 3, 4]);
    assert_eq!(r, v);
    let b = std::fs::read(&p).unwrap();
    assert_eq!((b.len() - 24 * 4) % 64, 0, "header not padded to 64 bytes");
    npy::write_f16(&dir.join("h.npy"), &[24], &v).unwrap();
    assert!(npy::read_f32(&dir.join("h.npy")).unwrap_err().to_string().contains("float32"));
    std::fs::write(dir.join("bad.npy"), b"nope").unwrap();
    assert!(npy::read_f32(&dir.join("bad.npy")).is_err());
}
