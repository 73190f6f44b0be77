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
    /// level `level`, the box's output) into `out` ([X, Y, Z, c] at that level).
    pub fn stitch(&self, which: [usize; 3], start: [usize; 3], level: u32, patch_out: &[f32], patch_shape: [usize; 3], out: &mut [f32], out_shape: [usize; 3], c: usize) {
        let f = 1usize << level;
        let off = [start[0] / f, start[1] / f, start[2] / f];
        for x in 0..patch_shape[0] {
            let gx = off[0] + x;
            if gx >= out_shape[0] || self.axes[0].owner[(gx * f).min(self.axes[0].owner.len() - 1)] != which[0] {
                continue;
            }
            for y in 0..patch_shape[1] {
                let gy = off[1] + y;
                if gy >= out_shape[1] || self.axes[1].owner[(gy * f).min(self.axes[1].owner.len() - 1)] != which[1] {
                    continue;
                }
                for z in 0..patch_shape[2] {
                    let gz = off[2] + z;
                    if gz >= out_shape[2] || self.axes[2].owner[(gz * f).min(self.axes[2].owner.len() - 1)] != which[2] {
                        continue;
                    }
                    let src = ((x * patch_shape[1] + y) * patch_shape[2] + z) * c;
                    let dst = ((gx * out_shape[1] + gy) * out_shape[2] + gz) * c;
                    out[dst..dst + c].copy_from_slice(&patch_out[src..src + c]);
                }
            }
        }
    }
}
