//! Sliding-window inference with the reference's central-region stitching
//! (`sw_predict` of the vox2vec code): patches of `patch` voxels with overlap
//! o = ceil(patch · 0.5) rounded up to even, stride patch − o; box k starts at k · stride
//! (the last one moved back to end at the border); box k writes only its centre, trimming
//! o / 2 on every side that is not the volume border; a later box overwrites an earlier one.
//!
//! Here every voxel is written exactly once: its owner is the last box whose written region
//! holds it — the same result as the reference's overwriting. Ownership is separable (the
//! boxes are a grid, visited in row-major order), so it is a per-axis table, and it carries
//! to coarser pyramid levels: voxel v of level i belongs to the owner of level-0 voxel v·2^i.

/// Per axis: box starts and, for every coordinate, the index of the box that writes it.
#[derive(Clone, Debug)]
pub struct AxisPlan {
    pub starts: Vec<usize>,
    pub owner: Vec<usize>,
}

/// The overlap of the reference: ceil(patch · 0.5), rounded up to even.
pub fn overlap_of(patch: usize) -> usize {
    let o = patch.div_ceil(2);
    o + o % 2
}

/// Boxes and owners along one axis of `size` ≥ `patch` voxels.
pub fn plan_axis(size: usize, patch: usize) -> AxisPlan {
    assert!(size >= patch && patch > 0, "plan_axis: size {size} < patch {patch}");
    let o = overlap_of(patch);
    let stride = (patch - o).max(1);
    let n = 1 + (size - patch).div_ceil(stride);
    let starts: Vec<usize> = (0..n).map(|k| (k * stride + patch).min(size) - patch).collect();
    let mut owner = vec![usize::MAX; size];
    for (k, &s) in starts.iter().enumerate() {
        let e = s + patch;
        let lo = if s > 0 { s + o / 2 } else { 0 };
        let hi = if e < size { e - o / 2 } else { size };
        for c in owner.iter_mut().take(hi).skip(lo) {
            *c = k;
        }
    }
    debug_assert!(owner.iter().all(|&k| k != usize::MAX));
    AxisPlan { starts, owner }
}

/// The plan for a volume: one `AxisPlan` per axis; boxes are visited in row-major order.
#[derive(Clone, Debug)]
pub struct Plan {
    pub axes: [AxisPlan; 3],
    pub patch: [usize; 3],
}

impl Plan {
    pub fn new(size: [usize; 3], patch: [usize; 3]) -> Plan {
        Plan { axes: [plan_axis(size[0], patch[0]), plan_axis(size[1], patch[1]), plan_axis(size[2], patch[2])], patch }
    }

    /// Every box as (index per axis, start).
    pub fn boxes(&self) -> Vec<([usize; 3], [usize; 3])> {
        let mut out = Vec::new();
        for (i, &sx) in self.axes[0].starts.iter().enumerate() {
            for (j, &sy) in self.axes[1].starts.iter().enumerate() {
                for (k, &sz) in self.axes[2].starts.iter().enumerate() {
                    out.push(([i, j, k], [sx, sy, sz]));
                }
            }
        }
        out
    }

    /// Copy the voxels that box `which` owns from `patch_out` ([px, py, pz, c] at pyramid
    /// level `level`, the box's output) into `out` ([X, Y, Z, c] at that level). A level-i
    /// voxel g takes the patch voxel that holds its centre (g·2^i + 2^(i-1) at level 0): boxes
    /// whose start is not a multiple of 2^i sit between the coarse grid's voxels.
    #[allow(clippy::too_many_arguments)]
    pub fn stitch(&self, which: [usize; 3], start: [usize; 3], level: u32, patch_out: &[f32], patch_shape: [usize; 3], out: &mut [f32], out_shape: [usize; 3], c: usize) {
        let f = 1usize << level;
        // Per axis: (global voxel, patch voxel) pairs this box writes.
        let axis = |a: usize| -> Vec<(usize, usize)> {
            let owner = &self.axes[a].owner;
            let (lo, hi) = (start[a] / f, (start[a] + self.patch[a]).div_ceil(f).min(out_shape[a]));
            (lo..hi)
                .filter(|&g| owner[(g * f).min(owner.len() - 1)] == which[a])
                .map(|g| (g, ((g * f + f / 2).saturating_sub(start[a]) / f).min(patch_shape[a] - 1)))
                .collect()
        };
        let (ax, ay, az) = (axis(0), axis(1), axis(2));
        for &(gx, px) in &ax {
            for &(gy, py) in &ay {
                for &(gz, pz) in &az {
                    let src = ((px * patch_shape[1] + py) * patch_shape[2] + pz) * c;
                    let dst = ((gx * out_shape[1] + gy) * out_shape[2] + gz) * c;
                    out[dst..dst + c].copy_from_slice(&patch_out[src..src + c]);
                }
            }
        }
    }

    /// Gaussian blending (MONAI's `sliding_window_inference(mode="gaussian")`, σ = 0.125 ·
    /// patch per axis): adds w · value into `acc` and w into `weight` for every voxel the box
    /// covers; dividing acc by weight afterwards gives the blended map.
    #[allow(clippy::too_many_arguments)]
    pub fn blend(&self, start: [usize; 3], level: u32, patch_out: &[f32], patch_shape: [usize; 3], acc: &mut [f32], weight: &mut [f32], out_shape: [usize; 3], c: usize) {
        let f = 1usize << level;
        let axis = |a: usize| -> Vec<(usize, usize, f32)> {
            let n = patch_shape[a];
            let sigma = 0.125 * n as f64;
            let centre = (n as f64 - 1.0) / 2.0;
            let (lo, hi) = (start[a] / f, (start[a] + self.patch[a]).div_ceil(f).min(out_shape[a]));
            (lo..hi)
                .map(|g| {
                    let j = ((g * f + f / 2).saturating_sub(start[a]) / f).min(n - 1);
                    let w = (-0.5 * ((j as f64 - centre) / sigma).powi(2)).exp().max(1e-6);
                    (g, j, w as f32)
                })
                .collect()
        };
        let (ax, ay, az) = (axis(0), axis(1), axis(2));
        for &(gx, px, wx) in &ax {
            for &(gy, py, wy) in &ay {
                for &(gz, pz, wz) in &az {
                    let w = wx * wy * wz;
                    let src = ((px * patch_shape[1] + py) * patch_shape[2] + pz) * c;
                    let g = (gx * out_shape[1] + gy) * out_shape[2] + gz;
                    for (a, &v) in acc[g * c..(g + 1) * c].iter_mut().zip(&patch_out[src..src + c]) {
                        *a += w * v;
                    }
                    weight[g] += w;
                }
            }
        }
    }
}
