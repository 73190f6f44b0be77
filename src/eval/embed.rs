//! Whole-volume embedding: the backbone in eval mode over sliding windows, each requested
//! pyramid level stitched with the reference's central-region rule (`sliding.rs`).
//!
//! Input intensities are the network's: clip((HU − lo) / (hi − lo), 0, 1) with the inference
//! window (−1350, 1000). Volumes smaller than the patch along an axis are padded at the end
//! (with 0, i.e. the window's lower bound) and the outputs cropped back.

use anyhow::{Result, ensure};

use super::sliding::Plan;
use crate::autograd::{Graph, Var};
use crate::model::Vox2Vec;
use crate::tensor::{Tensor, nxyzc_to_ncxyz};

pub const INFERENCE_WINDOW: (f32, f32) = (-1350.0, 1000.0);

/// HU → network input.
pub fn scale_hu(hu: &[i16]) -> Vec<f32> {
    let (lo, hi) = INFERENCE_WINDOW;
    hu.iter().map(|&h| ((h as f32 - lo) / (hi - lo)).clamp(0.0, 1.0)).collect()
}

/// The raw pyramid of one patch [X, Y, Z] (eval mode), each level as PyTorch's [C, X, Y, Z].
pub fn patch_pyramid(model: &mut Vox2Vec, x: &[f32], shape: [usize; 3]) -> Result<Vec<(Vec<usize>, Vec<f32>)>> {
    ensure!(x.len() == shape.iter().product::<usize>(), "patch has {} values for shape {shape:?}", x.len());
    let g = Graph::inference();
    let input = model.prepare_input(&Tensor::from_f32(&[1, shape[0], shape[1], shape[2], 1], x.to_vec()))?;
    let pyr = model.pyramid(&g, &Var::constant(input))?;
    pyr.iter()
        .map(|p| {
            let s = p.shape();
            Ok((vec![s[4], s[1], s[2], s[3]], nxyzc_to_ncxyz(&p.value.host_f32()?, 1, s[4], s[1] * s[2] * s[3])))
        })
        .collect()
}

/// How overlapping windows are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blend {
    /// The reference: each window writes only its central region (every voxel written once).
    Central,
    /// MONAI-style Gaussian weighting of every window's full output.
    Gaussian,
}

/// One stitched level: extent, channels, values [X, Y, Z, C] (channels last).
pub struct LevelMap {
    pub level: usize,
    pub shape: [usize; 3],
    pub channels: usize,
    pub values: Vec<f32>,
}

/// Embed a whole volume (network intensities, [X, Y, Z]) at the given levels.
pub fn embed_volume(model: &mut Vox2Vec, x: &[f32], shape: [usize; 3], patch: [usize; 3], levels: &[usize], blend: Blend, tick: &dyn Fn(usize, usize)) -> Result<Vec<LevelMap>> {
    let scales = model.config.fpn.num_scales;
    ensure!(levels.iter().all(|&l| l < scales), "levels {levels:?}: the backbone has {scales}");
    // Pad to at least the patch.
    let ps = [shape[0].max(patch[0]), shape[1].max(patch[1]), shape[2].max(patch[2])];
    let padded = if ps == shape {
        x.to_vec()
    } else {
        let mut p = vec![0.0f32; ps.iter().product()];
        for i in 0..shape[0] {
            for j in 0..shape[1] {
                let s = (i * shape[1] + j) * shape[2];
                let d = (i * ps[1] + j) * ps[2];
                p[d..d + shape[2]].copy_from_slice(&x[s..s + shape[2]]);
            }
        }
        p
    };
    let plan = Plan::new(ps, patch);
    let boxes = plan.boxes();
    let mut weights: Vec<Vec<f32>> = Vec::new();
    let mut maps: Vec<LevelMap> = levels
        .iter()
        .map(|&l| {
            let f = 1 << l;
            let s = [ps[0].div_ceil(f), ps[1].div_ceil(f), ps[2].div_ceil(f)];
            let c = model.config.fpn.channels(l);
            LevelMap { level: l, shape: s, channels: c, values: vec![0.0; s.iter().product::<usize>() * c] }
        })
        .collect();
    if blend == Blend::Gaussian {
        weights = maps.iter().map(|m| vec![0.0f32; m.shape.iter().product()]).collect();
    }
    for (n, (which, start)) in boxes.iter().enumerate() {
        let mut patch_x = Vec::with_capacity(patch.iter().product());
        for i in start[0]..start[0] + patch[0] {
            for j in start[1]..start[1] + patch[1] {
                let b = (i * ps[1] + j) * ps[2] + start[2];
                patch_x.extend_from_slice(&padded[b..b + patch[2]]);
            }
        }
        let g = Graph::inference();
        // On a device only the requested levels come back to the host (as f32).
        let input = model.prepare_input(&Tensor::from_f32(&[1, patch[0], patch[1], patch[2], 1], patch_x))?;
        let pyr = model.pyramid(&g, &Var::constant(input))?;
        for (mi, m) in maps.iter_mut().enumerate() {
            let p = &pyr[m.level];
            let s = p.shape();
            let values = p.value.host_f32()?;
            match blend {
                Blend::Central => plan.stitch(*which, *start, m.level as u32, &values, [s[1], s[2], s[3]], &mut m.values, m.shape, m.channels),
                Blend::Gaussian => plan.blend(*start, m.level as u32, &values, [s[1], s[2], s[3]], &mut m.values, &mut weights[mi], m.shape, m.channels),
            }
        }
        tick(n + 1, boxes.len());
    }
    if blend == Blend::Gaussian {
        for (m, w) in maps.iter_mut().zip(&weights) {
            let c = m.channels;
            for (v, &wt) in m.values.chunks_exact_mut(c).zip(w) {
                v.iter_mut().for_each(|x| *x /= wt);
            }
        }
    }
    // Crop the padding back off.
    for m in maps.iter_mut() {
        let f = 1 << m.level;
        let want = [shape[0].div_ceil(f), shape[1].div_ceil(f), shape[2].div_ceil(f)];
        if want != m.shape {
            let c = m.channels;
            let mut v = Vec::with_capacity(want.iter().product::<usize>() * c);
            for i in 0..want[0] {
                for j in 0..want[1] {
                    let b = ((i * m.shape[1] + j) * m.shape[2]) * c;
                    v.extend_from_slice(&m.values[b..b + want[2] * c]);
                }
            }
            m.values = v;
            m.shape = want;
        }
    }
    Ok(maps)
}
