//! Whole-volume embedding: the backbone in eval mode over sliding windows, each requested
//! pyramid level stitched with the reference's central-region rule (`sliding.rs`).
//!
//! Input intensities are the network's: clip((HU − lo) / (hi − lo), 0, 1) with the inference
//! window (−1350, 1000). Volumes smaller than the patch along an axis are padded at the end
//! (with 0, i.e. the window's lower bound) and the outputs cropped back.

use anyhow::{Result, ensure};

use super::sliding::{MapSpec, slide};
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

pub use super::sliding::{Blend, LevelMap};

/// Embed a whole volume (network intensities, [X, Y, Z]) at the given levels: the eval-mode
/// pyramid over sliding windows, `sw_batch` windows per forward pass, stitched where the
/// model runs (on a CUDA device only the finished levels come back).
#[allow(clippy::too_many_arguments)]
pub fn embed_volume(
    model: &mut Vox2Vec,
    x: &[f32],
    shape: [usize; 3],
    patch: [usize; 3],
    levels: &[usize],
    blend: Blend,
    sw_batch: usize,
    tick: &dyn Fn(usize, usize),
) -> Result<Vec<LevelMap>> {
    let scales = model.config.fpn.num_scales;
    ensure!(levels.iter().all(|&l| l < scales), "levels {levels:?}: the backbone has {scales}");
    let specs: Vec<MapSpec> =
        levels.iter().map(|&l| MapSpec { level: l, channels: model.config.fpn.channels(l) }).collect();
    let device = model.device();
    slide(
        x,
        shape,
        patch,
        sw_batch,
        blend,
        &specs,
        device,
        &mut |input| {
            let g = Graph::inference();
            let pyr = model.pyramid(&g, &Var::constant(model.prepare_input(&input)?))?;
            Ok(levels.iter().map(|&l| pyr[l].value.clone()).collect())
        },
        tick,
    )
}

/// The voxel-to-world affine of pyramid level `level` of a preprocessed CT (NIfTI world, mm).
/// Level-0 voxel i along axis a sits at source canonical coordinate
/// crop_start + i · (crop_len − 1) / (n − 1) (the zoom's end-aligned map, as
/// `preprocess::to_source_grid` inverts it); level-l voxel j at level-0 coordinate
/// j · 2^l + (2^l − 1) / 2, the centre of the voxels it pools.
pub fn level_affine(e: &crate::data::cache::CachedCt, level: usize) -> [[f64; 4]; 4] {
    use crate::data::nifti_io::{canonical_affine_of, grid_affine};
    let ct = &e.ct;
    let canonical = canonical_affine_of(&e.file_affine, e.orientation, ct.source_shape);
    let f = (1usize << level) as f64;
    let mut origin = [0.0; 3];
    let mut step = [1.0; 3];
    for a in 0..3 {
        let len = (ct.crop_box[a][1] - ct.crop_box[a][0]) as f64;
        let s = if ct.shape[a] > 1 { (len - 1.0) / (ct.shape[a] - 1) as f64 } else { len.max(1.0) };
        origin[a] = ct.crop_box[a][0] as f64 + s * (f - 1.0) / 2.0;
        step[a] = s * f;
    }
    grid_affine(&canonical, origin, step)
}
