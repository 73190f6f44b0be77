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

/// HU → network input (docs/method.md §1.7).
pub fn scale_hu(hu: &[i16]) -> Vec<f32> {
    hu.iter().map(|&h| scale_hu_voxel(h)).collect()
}

/// One voxel's HU → network input, with `INFERENCE_WINDOW`.
pub fn scale_hu_voxel(h: i16) -> f32 {
    let (lo, hi) = INFERENCE_WINDOW;
    ((h as f32 - lo) / (hi - lo)).clamp(0.0, 1.0)
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

/// A level's features on the CT's canonical source grid (before cropping and resampling),
/// channels last: each level voxel copied onto the level-0 voxels it covers (nearest), then
/// level 0 put back through the crop and resampling (`preprocess::to_source_grid`); voxels
/// outside the crop get 0.
pub fn level_on_source_grid(m: &super::sliding::LevelMap, ct: &crate::data::preprocess::PreprocessedCt) -> Vec<f32> {
    let (f, s0, c) = (1usize << m.level, ct.shape, m.channels);
    let mut up = vec![0.0f32; s0.iter().product::<usize>() * c];
    for a in 0..s0[0] {
        for b in 0..s0[1] {
            for z in 0..s0[2] {
                let src = (((a / f) * m.shape[1] + b / f) * m.shape[2] + z / f) * c;
                let dst = ((a * s0[1] + b) * s0[2] + z) * c;
                up[dst..dst + c].copy_from_slice(&m.values[src..src + c]);
            }
        }
    }
    let mut on_source = vec![0.0f32; ct.source_shape.iter().product::<usize>() * c];
    for ch in 0..c {
        let one: Vec<f32> = up.iter().skip(ch).step_by(c).copied().collect();
        for (i, v) in crate::data::preprocess::to_source_grid(&one, ct, 0.0f32).into_iter().enumerate() {
            on_source[i * c + ch] = v;
        }
    }
    on_source
}

#[cfg(test)]
mod tests {
    use super::level_on_source_grid;
    use crate::data::preprocess::{PreprocessConfig, preprocess_ct, to_source_grid};
    use crate::eval::sliding::LevelMap;

    #[test]
    fn levels_reach_the_source_grid_through_their_parents() {
        // A body block inside air, resampled from 1.5 × 1 × 3 mm to 1 × 1 × 2 mm.
        let shape = [12, 10, 7];
        let mut hu = vec![-1000.0f32; shape.iter().product()];
        for x in 2..10 {
            for y in 1..9 {
                for z in 1..6 {
                    hu[(x * shape[1] + y) * shape[2] + z] = 40.0;
                }
            }
        }
        let ct = preprocess_ct(&hu, shape, [1.5, 1.0, 3.0], &PreprocessConfig::default()).unwrap();
        let s0 = ct.shape;
        let half = s0.map(|n| n.div_ceil(2));
        let c = 2;
        // Level 1: channel 0 is the flat index of the level voxel, channel 1 its negation.
        let values: Vec<f32> = (0..half.iter().product::<usize>()).flat_map(|i| [i as f32, -(i as f32)]).collect();
        let m = LevelMap { level: 1, shape: half, channels: c, values };
        let got = level_on_source_grid(&m, &ct);
        let parent: Vec<f32> = (0..s0.iter().product::<usize>())
            .map(|i| {
                let (a, b, z) = (i / (s0[1] * s0[2]), (i / s0[2]) % s0[1], i % s0[2]);
                (((a / 2) * half[1] + b / 2) * half[2] + z / 2) as f32
            })
            .collect();
        let want = to_source_grid(&parent, &ct, 0.0f32);
        assert_eq!(got.len(), shape.iter().product::<usize>() * c);
        for (i, w) in want.iter().enumerate() {
            assert_eq!((got[i * c], got[i * c + 1]), (*w, -*w), "source voxel {i}");
        }
        // Level 0 is the map itself, put back on the source grid.
        let flat: Vec<f32> = (0..s0.iter().product::<usize>()).map(|i| i as f32 + 0.5).collect();
        let m0 = LevelMap { level: 0, shape: s0, channels: 1, values: flat.clone() };
        assert_eq!(level_on_source_grid(&m0, &ct), to_source_grid(&flat, &ct, 0.0f32));
    }
}
