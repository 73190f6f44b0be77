//! vox2vec preprocessing of a CT volume (docs/method.md §1), on canonical arrays [X, Y, Z]:
//! crop to the body's bounding box (HU ≥ −500), resample to (1, 1, 2) mm with
//! `scipy.ndimage.zoom` semantics (zoom = old / new spacing, new size = round(size · zoom),
//! first and last voxel centres of each axis map onto each other; linear for images, nearest
//! for label maps; outside values = the image minimum), and the body mask: air (HU < −500)
//! flood-filled in 3-D with 26-connectivity from a one-voxel air frame around x and y; the
//! body is everything not reached.

use std::collections::VecDeque;

use anyhow::{Result, ensure};
use rayon::prelude::*;

pub use super::nifti_io::NonFinitePolicy;

pub const BODY_THRESHOLD_HU: f32 = -500.0;
pub const TARGET_SPACING: [f64; 3] = [1.0, 1.0, 2.0];

/// Settings of the preprocessing (part of the cache key).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PreprocessConfig {
    pub body_threshold_hu: f32,
    pub spacing: [f64; 3],
    /// NaN / infinite voxels: refuse the file (default) or replace them by the image minimum.
    pub nonfinite: NonFinitePolicy,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        PreprocessConfig {
            body_threshold_hu: BODY_THRESHOLD_HU,
            spacing: TARGET_SPACING,
            nonfinite: NonFinitePolicy::Error,
        }
    }
}

/// A resampling spacing as the flags take it, "X,Y,Z" in mm (each finite and > 0).
pub fn parse_spacing(s: &str) -> anyhow::Result<[f64; 3]> {
    let p: Vec<f64> = s
        .split(',')
        .map(|t| t.trim().parse())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("spacing {s:?}: {e}"))?;
    anyhow::ensure!(
        p.len() == 3 && p.iter().all(|&v| v > 0.0 && v.is_finite()),
        "spacing must be X,Y,Z in mm, got {s:?}"
    );
    Ok([p[0], p[1], p[2]])
}

/// Index ranges [start, end) per axis.
pub type Box3 = [[usize; 2]; 3];

fn idx(shape: [usize; 3], x: usize, y: usize, z: usize) -> usize {
    (x * shape[1] + y) * shape[2] + z
}

/// Bounding box of the voxels with value ≥ threshold, or None if there are none.
pub fn body_bbox(data: &[f32], shape: [usize; 3], threshold: f32) -> Option<Box3> {
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    for x in 0..shape[0] {
        for y in 0..shape[1] {
            let line = &data[idx(shape, x, y, 0)..idx(shape, x, y, 0) + shape[2]];
            let first = line.iter().position(|&v| v >= threshold);
            if let Some(z0) = first {
                let z1 = line.iter().rposition(|&v| v >= threshold).unwrap();
                for (a, v) in [(0, x), (1, y)] {
                    lo[a] = lo[a].min(v);
                    hi[a] = hi[a].max(v + 1);
                }
                lo[2] = lo[2].min(z0);
                hi[2] = hi[2].max(z1 + 1);
            }
        }
    }
    (lo[0] != usize::MAX).then_some([[lo[0], hi[0]], [lo[1], hi[1]], [lo[2], hi[2]]])
}

/// The sub-array of a [X, Y, Z] array inside `b`.
pub fn crop<T: Copy>(data: &[T], shape: [usize; 3], b: Box3) -> (Vec<T>, [usize; 3]) {
    let ns = [b[0][1] - b[0][0], b[1][1] - b[1][0], b[2][1] - b[2][0]];
    let mut out = Vec::with_capacity(ns.iter().product());
    for x in b[0][0]..b[0][1] {
        for y in b[1][0]..b[1][1] {
            let s = idx(shape, x, y, b[2][0]);
            out.extend_from_slice(&data[s..s + ns[2]]);
        }
    }
    (out, ns)
}

/// The largest resampled grid we build, in voxels (2 GiB as f32): a 512 × 512 × 2000 CT at
/// 0.5 mm resamples to 256 × 256 × 500 = 33 M voxels at the reference spacing, so only a
/// damaged header (a voxel size of metres) reaches it.
pub const MAX_GRID_VOXELS: usize = 1 << 29;
/// The largest resampled axis, in voxels.
pub const MAX_GRID_AXIS: usize = 16384;

/// Output size of scipy's zoom: round(size · zoom), ties to even as Python's round.
pub fn zoomed_shape(shape: [usize; 3], spacing: [f64; 3], target: [f64; 3]) -> [usize; 3] {
    let mut out = [0; 3];
    for a in 0..3 {
        out[a] = ((shape[a] as f64 * spacing[a] / target[a]).round_ties_even() as usize).max(1);
    }
    out
}

/// `zoomed_shape`, refused (before anything is allocated) when the grid would exceed
/// `MAX_GRID_AXIS` per axis or `MAX_GRID_VOXELS` in all.
pub fn checked_zoomed_shape(shape: [usize; 3], spacing: [f64; 3], target: [f64; 3]) -> Result<[usize; 3]> {
    for a in 0..3 {
        ensure!(spacing[a].is_finite() && spacing[a] > 0.0, "voxel size {:?} mm is not positive and finite", spacing);
        let n = shape[a] as f64 * spacing[a] / target[a];
        ensure!(
            n.is_finite() && n <= MAX_GRID_AXIS as f64,
            "resampling {shape:?} voxels of {spacing:?} mm to {target:?} mm gives {n:.3e} voxels along axis {a}, more than the limit of {MAX_GRID_AXIS} (is the voxel size in the header right?)"
        );
    }
    let out = zoomed_shape(shape, spacing, target);
    let total = out.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n)).unwrap_or(usize::MAX);
    ensure!(
        total <= MAX_GRID_VOXELS,
        "resampling {shape:?} voxels of {spacing:?} mm to {target:?} mm gives a grid of {out:?} = {total} voxels, more than the limit of {MAX_GRID_VOXELS} (is the voxel size in the header right?)"
    );
    Ok(out)
}

/// Source coordinate of output index i along an axis (grid_mode=False: end points aligned).
fn source_coord(i: usize, n_in: usize, n_out: usize) -> f64 {
    if n_out <= 1 { 0.0 } else { i as f64 * (n_in - 1) as f64 / (n_out - 1) as f64 }
}

/// Linear resampling along one axis of a [A, B, C] array viewed as (outer, n, inner).
fn resample_axis_linear(data: &[f32], outer: usize, n_in: usize, inner: usize, n_out: usize, cval: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; outer * n_out * inner];
    let taps: Vec<(usize, f32)> = (0..n_out)
        .map(|i| {
            let c = source_coord(i, n_in, n_out);
            let i0 = c.floor() as usize;
            (i0.min(n_in - 1), (c - i0 as f64) as f32)
        })
        .collect();
    out.par_chunks_mut(n_out * inner).enumerate().for_each(|(o, dst)| {
        let src = &data[o * n_in * inner..(o + 1) * n_in * inner];
        for (i, &(i0, w)) in taps.iter().enumerate() {
            let a = &src[i0 * inner..(i0 + 1) * inner];
            let d = &mut dst[i * inner..(i + 1) * inner];
            if w == 0.0 {
                d.copy_from_slice(a);
            } else if i0 + 1 < n_in {
                let b = &src[(i0 + 1) * inner..(i0 + 2) * inner];
                for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                    *d = a * (1.0 - w) + b * w;
                }
            } else {
                for (d, &a) in d.iter_mut().zip(a) {
                    *d = a * (1.0 - w) + cval * w;
                }
            }
        }
    });
    out
}

/// Linear (order 1) zoom of a [X, Y, Z] array to `new_shape`, separably, axis by axis.
pub fn zoom_linear(data: &[f32], shape: [usize; 3], new_shape: [usize; 3], cval: f32) -> Vec<f32> {
    let a = resample_axis_linear(data, 1, shape[0], shape[1] * shape[2], new_shape[0], cval);
    let b = resample_axis_linear(&a, new_shape[0], shape[1], shape[2], new_shape[1], cval);
    resample_axis_linear(&b, new_shape[0] * new_shape[1], shape[2], 1, new_shape[2], cval)
}

/// Nearest (order 0) zoom, for label maps: source index floor(coord + 0.5).
pub fn zoom_nearest<T: Copy + Send + Sync + Default>(data: &[T], shape: [usize; 3], new_shape: [usize; 3]) -> Vec<T> {
    let pick = |a: usize| -> Vec<usize> {
        (0..new_shape[a])
            .map(|i| ((source_coord(i, shape[a], new_shape[a]) + 0.5).floor() as usize).min(shape[a] - 1))
            .collect()
    };
    let (px, py, pz) = (pick(0), pick(1), pick(2));
    let mut out = vec![T::default(); new_shape.iter().product()];
    out.par_chunks_mut(new_shape[1] * new_shape[2]).enumerate().for_each(|(x, plane)| {
        for (y, &sy) in py.iter().enumerate() {
            for (z, &sz) in pz.iter().enumerate() {
                plane[y * new_shape[2] + z] = data[idx(shape, px[x], sy, sz)];
            }
        }
    });
    out
}

/// Body mask (docs/method.md §1.6): air = HU < threshold; the air connected (26-neighbour) to
/// a one-voxel air frame padded around x and y is outside; the body is the rest.
pub fn body_mask(hu: &[f32], shape: [usize; 3], threshold: f32) -> Vec<bool> {
    let (px, py, pz) = (shape[0] + 2, shape[1] + 2, shape[2]);
    let pidx = |x: usize, y: usize, z: usize| (x * py + y) * pz + z;
    let air = |x: usize, y: usize, z: usize| -> bool {
        x == 0 || y == 0 || x == px - 1 || y == py - 1 || hu[idx(shape, x - 1, y - 1, z)] < threshold
    };
    let mut outside = vec![false; px * py * pz];
    let mut queue = VecDeque::new();
    if pz > 0 {
        outside[pidx(0, 0, 0)] = true;
        queue.push_back((0usize, 0usize, 0usize));
    }
    while let Some((x, y, z)) = queue.pop_front() {
        for dx in -1i64..=1 {
            for dy in -1i64..=1 {
                for dz in -1i64..=1 {
                    let (nx, ny, nz) = (x as i64 + dx, y as i64 + dy, z as i64 + dz);
                    if nx < 0 || ny < 0 || nz < 0 || nx >= px as i64 || ny >= py as i64 || nz >= pz as i64 {
                        continue;
                    }
                    let (nx, ny, nz) = (nx as usize, ny as usize, nz as usize);
                    let i = pidx(nx, ny, nz);
                    if !outside[i] && air(nx, ny, nz) {
                        outside[i] = true;
                        queue.push_back((nx, ny, nz));
                    }
                }
            }
        }
    }
    let mut body = vec![false; hu.len()];
    for x in 0..shape[0] {
        for y in 0..shape[1] {
            for z in 0..shape[2] {
                body[idx(shape, x, y, z)] = !outside[pidx(x + 1, y + 1, z)];
            }
        }
    }
    body
}

/// A preprocessed CT: int16 HU on the target grid, its body mask, and where it came from.
#[derive(Clone, Debug)]
pub struct PreprocessedCt {
    pub hu: Vec<i16>,
    pub shape: [usize; 3],
    /// Flat indices (x·Y·Z + y·Z + z) of the body voxels, ascending.
    pub body: Vec<u32>,
    /// The crop box in the canonical (pre-resampling) grid.
    pub crop_box: Box3,
    /// Canonical shape and spacing before cropping and resampling.
    pub source_shape: [usize; 3],
    pub source_spacing: [f64; 3],
    pub spacing: [f64; 3],
}

impl PreprocessedCt {
    /// Body mask as booleans over the volume.
    pub fn body_mask(&self) -> Vec<bool> {
        let mut m = vec![false; self.hu.len()];
        for &i in &self.body {
            m[i as usize] = true;
        }
        m
    }
}

/// The whole pipeline on a canonical HU volume.
pub fn preprocess_ct(
    hu: &[f32],
    shape: [usize; 3],
    spacing: [f64; 3],
    cfg: &PreprocessConfig,
) -> Result<PreprocessedCt> {
    ensure!(hu.len() == shape.iter().product::<usize>(), "volume size does not match its shape {shape:?}");
    let bbox = body_bbox(hu, shape, cfg.body_threshold_hu)
        .ok_or_else(|| anyhow::anyhow!("no voxel ≥ {} HU: the volume has no body", cfg.body_threshold_hu))?;
    let (cropped, cshape) = crop(hu, shape, bbox);
    let min = cropped.iter().cloned().fold(f32::INFINITY, f32::min);
    let new_shape = checked_zoomed_shape(cshape, spacing, cfg.spacing)?;
    let res = zoom_linear(&cropped, cshape, new_shape, min);
    let hu16: Vec<i16> = res.iter().map(|&v| v.round().clamp(i16::MIN as f32, i16::MAX as f32) as i16).collect();
    let asf: Vec<f32> = hu16.iter().map(|&v| v as f32).collect();
    let mask = body_mask(&asf, new_shape, cfg.body_threshold_hu);
    let body: Vec<u32> = mask.iter().enumerate().filter(|(_, b)| **b).map(|(i, _)| i as u32).collect();
    ensure!(!body.is_empty(), "the body mask is empty after resampling");
    Ok(PreprocessedCt {
        hu: hu16,
        shape: new_shape,
        body,
        crop_box: bbox,
        source_shape: shape,
        source_spacing: spacing,
        spacing: cfg.spacing,
    })
}

/// A label map on the same canonical grid, cropped and resampled (nearest) exactly as its
/// image was.
pub fn preprocess_labels(labels: &[u8], ct: &PreprocessedCt) -> Result<Vec<u8>> {
    ensure!(
        labels.len() == ct.source_shape.iter().product::<usize>(),
        "label map shape differs from its image {:?}",
        ct.source_shape
    );
    let (cropped, cshape) = crop(labels, ct.source_shape, ct.crop_box);
    Ok(zoom_nearest(&cropped, cshape, ct.shape))
}

/// A map on the preprocessed grid carried back onto the canonical source grid (before crop
/// and resampling): each source voxel in the crop box takes the nearest preprocessed voxel
/// (inverse of the zoom's coordinate map), voxels outside the box get `outside`.
pub fn to_source_grid<T: Copy + Send + Sync>(pre: &[T], ct: &PreprocessedCt, outside: T) -> Vec<T> {
    let src = ct.source_shape;
    let b = ct.crop_box;
    let cs = [b[0][1] - b[0][0], b[1][1] - b[1][0], b[2][1] - b[2][0]];
    let map = |a: usize| -> Vec<usize> {
        (0..cs[a])
            .map(|i| {
                let u = if cs[a] <= 1 { 0.0 } else { i as f64 * (ct.shape[a] - 1) as f64 / (cs[a] - 1) as f64 };
                (u.round() as usize).min(ct.shape[a] - 1)
            })
            .collect()
    };
    let (mx, my, mz) = (map(0), map(1), map(2));
    let mut out = vec![outside; src.iter().product()];
    out.par_chunks_mut(src[1] * src[2]).enumerate().for_each(|(x, plane)| {
        if x < b[0][0] || x >= b[0][1] {
            return;
        }
        for y in b[1][0]..b[1][1] {
            for z in b[2][0]..b[2][1] {
                let p = (mx[x - b[0][0]] * ct.shape[1] + my[y - b[1][0]]) * ct.shape[2] + mz[z - b[2][0]];
                plane[y * src[2] + z] = pre[p];
            }
        }
    });
    out
}
