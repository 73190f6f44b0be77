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

    /// Along axis `a`, the voxels of pyramid level `level` that the box with index `which` and
    /// start `start` on that axis contributes to: output coordinate, coordinate in the box's
    /// output (`window_len` voxels along the axis at that level) and MONAI's Gaussian weight.
    /// A level-i voxel g takes the box voxel that holds its centre (g·2^i + 2^(i-1) at level
    /// 0): boxes whose start is not a multiple of 2^i sit between the coarse grid's voxels.
    /// `owned_only`: only the voxels the box owns (the central-region rule), else every voxel
    /// it covers (Gaussian blending).
    #[allow(clippy::too_many_arguments)]
    pub fn axis_entries(
        &self,
        a: usize,
        which: usize,
        start: usize,
        level: u32,
        window_len: usize,
        out_len: usize,
        owned_only: bool,
    ) -> AxisEntries {
        let f = 1usize << level;
        let owner = &self.axes[a].owner;
        let sigma = 0.125 * window_len as f64;
        let centre = (window_len as f64 - 1.0) / 2.0;
        let (lo, hi) = (start / f, (start + self.patch[a]).div_ceil(f).min(out_len));
        let mut e = AxisEntries::default();
        for g in lo..hi {
            if owned_only && owner[(g * f).min(owner.len() - 1)] != which {
                continue;
            }
            let j = ((g * f + f / 2).saturating_sub(start) / f).min(window_len - 1);
            e.out.push(g as i32);
            e.window.push(j as i32);
            e.weight.push((-0.5 * ((j as f64 - centre) / sigma).powi(2)).exp().max(1e-6) as f32);
        }
        e
    }

    /// The entries of box `which` (index per axis) with start `start` along all three axes.
    #[allow(clippy::too_many_arguments)]
    fn entries(
        &self,
        which: [usize; 3],
        start: [usize; 3],
        level: u32,
        window_shape: [usize; 3],
        out_shape: [usize; 3],
        owned_only: bool,
    ) -> [AxisEntries; 3] {
        [0, 1, 2].map(|a| self.axis_entries(a, which[a], start[a], level, window_shape[a], out_shape[a], owned_only))
    }

    /// Copy the voxels that box `which` owns from `patch_out` ([px, py, pz, c] at pyramid
    /// level `level`, the box's output) into `out` ([X, Y, Z, c] at that level).
    #[allow(clippy::too_many_arguments)]
    pub fn stitch(
        &self,
        which: [usize; 3],
        start: [usize; 3],
        level: u32,
        patch_out: &[f32],
        patch_shape: [usize; 3],
        out: &mut [f32],
        out_shape: [usize; 3],
        c: usize,
    ) {
        let [ax, ay, az] = self.entries(which, start, level, patch_shape, out_shape, true);
        for (&gx, &px) in ax.out.iter().zip(&ax.window) {
            for (&gy, &py) in ay.out.iter().zip(&ay.window) {
                for (&gz, &pz) in az.out.iter().zip(&az.window) {
                    let src = ((px as usize * patch_shape[1] + py as usize) * patch_shape[2] + pz as usize) * c;
                    let dst = ((gx as usize * out_shape[1] + gy as usize) * out_shape[2] + gz as usize) * c;
                    out[dst..dst + c].copy_from_slice(&patch_out[src..src + c]);
                }
            }
        }
    }

    /// Gaussian blending (MONAI's `sliding_window_inference(mode="gaussian")`, σ = 0.125 ·
    /// patch per axis): adds w · value into `acc` and w into `weight` for every voxel the box
    /// covers; dividing acc by weight afterwards gives the blended map.
    #[allow(clippy::too_many_arguments)]
    pub fn blend(
        &self,
        start: [usize; 3],
        level: u32,
        patch_out: &[f32],
        patch_shape: [usize; 3],
        acc: &mut [f32],
        weight: &mut [f32],
        out_shape: [usize; 3],
        c: usize,
    ) {
        let [ax, ay, az] = self.entries([0; 3], start, level, patch_shape, out_shape, false);
        for ((&gx, &px), &wx) in ax.out.iter().zip(&ax.window).zip(&ax.weight) {
            for ((&gy, &py), &wy) in ay.out.iter().zip(&ay.window).zip(&ay.weight) {
                for ((&gz, &pz), &wz) in az.out.iter().zip(&az.window).zip(&az.weight) {
                    // (wx wy) wz in f32, as kernels/stitch.cu's blend_window.
                    let w = wx * wy * wz;
                    let src = ((px as usize * patch_shape[1] + py as usize) * patch_shape[2] + pz as usize) * c;
                    let g = (gx as usize * out_shape[1] + gy as usize) * out_shape[2] + gz as usize;
                    for (a, &v) in acc[g * c..(g + 1) * c].iter_mut().zip(&patch_out[src..src + c]) {
                        *a += w * v;
                    }
                    weight[g] += w;
                }
            }
        }
    }
}

/// One box's voxels along one axis (`Plan::axis_entries`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AxisEntries {
    pub out: Vec<i32>,
    pub window: Vec<i32>,
    pub weight: Vec<f32>,
}

/// How overlapping windows are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blend {
    /// The reference: each window writes only its central region (every voxel written once).
    Central,
    /// MONAI-style Gaussian weighting of every window's full output.
    Gaussian,
}

/// One map a sliding window produces: its pyramid level (grid = the volume's / 2^level,
/// rounded up) and channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub level: usize,
    pub channels: usize,
}

/// One stitched map: level, extent, channels, values [X, Y, Z, C] (channels last).
pub struct LevelMap {
    pub level: usize,
    pub shape: [usize; 3],
    pub channels: usize,
    pub values: Vec<f32>,
}

/// Where the stitched maps live while the windows run: host vectors, or f32 device tensors
/// written by `kernels/stitch.cu` (copied back once, at the end).
enum Maps {
    Host {
        values: Vec<Vec<f32>>,
        weights: Vec<Vec<f32>>,
    },
    Device {
        values: Vec<crate::tensor::Tensor>,
        weights: Vec<crate::tensor::Tensor>,
        tables: Vec<[crate::cuda::ops::stitch::AxisTable; 3]>,
    },
}

/// Sliding-window inference over a volume `x` ([X, Y, Z] network intensities): windows of
/// `patch` voxels as `Plan` lays them out, run `sw_batch` at a time (MONAI's `sw_batch_size`)
/// through `run`, which maps an input [K, px, py, pz, 1] (host, K ≤ sw_batch) to one
/// [K, lx, ly, lz, C] tensor per entry of `specs` (host or device). Each output is stitched
/// into its map by `blend`: on the host, or on `device` when that is a CUDA device (then only
/// the finished maps come back). A volume smaller than the patch along an axis is padded at
/// the end with 0 (the window's lower bound) and the maps are cropped back.
/// `tick(done, total)` after each batch of windows.
#[allow(clippy::too_many_arguments)]
pub fn slide(
    x: &[f32],
    shape: [usize; 3],
    patch: [usize; 3],
    sw_batch: usize,
    blend: Blend,
    specs: &[MapSpec],
    device: crate::tensor::Device,
    run: &mut dyn FnMut(crate::tensor::Tensor) -> anyhow::Result<Vec<crate::tensor::Tensor>>,
    tick: &dyn Fn(usize, usize),
) -> anyhow::Result<Vec<LevelMap>> {
    use crate::tensor::{Device, Tensor};
    anyhow::ensure!(
        x.len() == shape.iter().product::<usize>(),
        "sliding window: {} values for a {shape:?} volume",
        x.len()
    );
    anyhow::ensure!(sw_batch >= 1, "the sliding-window batch must be at least 1");
    let ps = [shape[0].max(patch[0]), shape[1].max(patch[1]), shape[2].max(patch[2])];
    let padded = if ps == shape {
        std::borrow::Cow::Borrowed(x)
    } else {
        let mut p = vec![0.0f32; ps.iter().product()];
        for i in 0..shape[0] {
            for j in 0..shape[1] {
                let s = (i * shape[1] + j) * shape[2];
                let d = (i * ps[1] + j) * ps[2];
                p[d..d + shape[2]].copy_from_slice(&x[s..s + shape[2]]);
            }
        }
        std::borrow::Cow::Owned(p)
    };
    let plan = Plan::new(ps, patch);
    let boxes = plan.boxes();
    let level_shape = |l: usize| {
        let f = 1usize << l;
        [ps[0].div_ceil(f), ps[1].div_ceil(f), ps[2].div_ceil(f)]
    };
    let gaussian = blend == Blend::Gaussian;
    let mut maps = match device {
        Device::Cpu => Maps::Host {
            values: specs
                .iter()
                .map(|s| vec![0.0; level_shape(s.level).iter().product::<usize>() * s.channels])
                .collect(),
            weights: if gaussian {
                specs.iter().map(|s| vec![0.0; level_shape(s.level).iter().product()]).collect()
            } else {
                Vec::new()
            },
        },
        Device::Cuda(o) => {
            let dev = crate::cuda::device(o)?;
            let zeros = |shape: &[usize]| crate::cuda::zeros(&dev, shape, crate::tensor::DType::F32);
            let values = specs
                .iter()
                .map(|s| {
                    let l = level_shape(s.level);
                    zeros(&[l[0], l[1], l[2], s.channels])
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let weights = if gaussian {
                specs.iter().map(|s| zeros(&level_shape(s.level))).collect::<anyhow::Result<Vec<_>>>()?
            } else {
                Vec::new()
            };
            Maps::Device { values, weights, tables: Vec::new() }
        }
    };
    let window_voxels: usize = patch.iter().product();
    let mut done = 0;
    for chunk in boxes.chunks(sw_batch) {
        let mut input = Vec::with_capacity(chunk.len() * window_voxels);
        for (_, start) in chunk {
            for i in start[0]..start[0] + patch[0] {
                for j in start[1]..start[1] + patch[1] {
                    let b = (i * ps[1] + j) * ps[2] + start[2];
                    input.extend_from_slice(&padded[b..b + patch[2]]);
                }
            }
        }
        let outputs = run(Tensor::from_f32(&[chunk.len(), patch[0], patch[1], patch[2], 1], input))?;
        anyhow::ensure!(
            outputs.len() == specs.len(),
            "sliding window: {} outputs for {} maps",
            outputs.len(),
            specs.len()
        );
        for (mi, (spec, out)) in specs.iter().zip(&outputs).enumerate() {
            let s = out.shape();
            anyhow::ensure!(
                s.len() == 5 && s[0] == chunk.len() && s[4] == spec.channels,
                "sliding window: output {mi} has shape {s:?}, expected [{}, X, Y, Z, {}]",
                chunk.len(),
                spec.channels
            );
            let wshape = [s[1], s[2], s[3]];
            let per_window = wshape.iter().product::<usize>() * spec.channels;
            let out_shape = level_shape(spec.level);
            let level = spec.level as u32;
            match &mut maps {
                Maps::Host { values, weights } => {
                    let v = out.host_f32()?;
                    for (b, (which, start)) in chunk.iter().enumerate() {
                        let w = &v[b * per_window..(b + 1) * per_window];
                        if gaussian {
                            plan.blend(
                                *start,
                                level,
                                w,
                                wshape,
                                &mut values[mi],
                                &mut weights[mi],
                                out_shape,
                                spec.channels,
                            );
                        } else {
                            plan.stitch(*which, *start, level, w, wshape, &mut values[mi], out_shape, spec.channels);
                        }
                    }
                }
                Maps::Device { values, weights, tables } => {
                    use crate::cuda::ops::stitch;
                    let out = out.to_device(values[mi].device())?;
                    if tables.len() <= mi {
                        tables.push(stitch::AxisTable::for_plan(
                            &values[mi],
                            &plan,
                            level,
                            wshape,
                            out_shape,
                            !gaussian,
                        )?);
                    }
                    for (b, (which, _)) in chunk.iter().enumerate() {
                        let t = &tables[mi];
                        if gaussian {
                            stitch::blend_window(&out, b, t, *which, &values[mi], &weights[mi])?;
                        } else {
                            stitch::stitch_window(&out, b, t, *which, &values[mi])?;
                        }
                    }
                }
            }
        }
        done += chunk.len();
        tick(done, boxes.len());
    }
    let (mut values, weights): (Vec<Vec<f32>>, Vec<Vec<f32>>) = match maps {
        Maps::Host { values, weights } => (values, weights),
        Maps::Device { values, weights, .. } => {
            if gaussian {
                for (v, w) in values.iter().zip(&weights) {
                    crate::cuda::ops::stitch::blend_normalize(v, w)?;
                }
            }
            (values.iter().map(|t| t.to_f32_vec()).collect::<anyhow::Result<_>>()?, Vec::new())
        }
    };
    if gaussian && !weights.is_empty() {
        for ((v, w), spec) in values.iter_mut().zip(&weights).zip(specs) {
            for (v, &wt) in v.chunks_exact_mut(spec.channels).zip(w) {
                v.iter_mut().for_each(|x| *x /= wt);
            }
        }
    }
    // Crop the padding back off.
    let mut result = Vec::with_capacity(specs.len());
    for (spec, v) in specs.iter().zip(values.iter_mut()) {
        let have = level_shape(spec.level);
        let f = 1 << spec.level;
        let want = [shape[0].div_ceil(f), shape[1].div_ceil(f), shape[2].div_ceil(f)];
        let c = spec.channels;
        let values = if want == have {
            std::mem::take(v)
        } else {
            let mut out = Vec::with_capacity(want.iter().product::<usize>() * c);
            for i in 0..want[0] {
                for j in 0..want[1] {
                    let b = ((i * have[1] + j) * have[2]) * c;
                    out.extend_from_slice(&v[b..b + want[2] * c]);
                }
            }
            out
        };
        result.push(LevelMap { level: spec.level, shape: want, channels: c, values });
    }
    Ok(result)
}
