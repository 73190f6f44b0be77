//! The two-view pretraining sampler (docs/method.md §2). One batch = one CT: for each of
//! `pairs` view pairs, an anchor among the body voxels, two patch boxes that contain it,
//! per-view intensity augmentations, and the body voxels seen by both patches as positive
//! pairs (at most `max_voxels` per pair, a random subset without replacement).
//!
//! Augmentations per view, in this order (probabilities and ranges are `AugmentConfig`):
//! with p = 0.5 either (p = 0.5) a Gaussian blur in the axial plane (x and y), σ ~ U(0.25, 1.5),
//! or a Gaussian sharpening b + α (b − blur(b, 0.5)), b = blur(x, σ ~ U(0.5, 1)), α ~ U(10, 30);
//! with p = 0.5 additive Gaussian noise σ ~ U(0, 30) HU; then a window, with p = 0.8 random
//! (lo ~ U(−1350, −1000), hi ~ U(300, 1000)) else (−1350, 1000), x ← clip((x − lo)/(hi − lo), 0, 1).
//! Blurs are `scipy.ndimage.gaussian_filter1d` (kernel truncated at 4σ, mode "reflect").
//!
//! Everything is drawn from the one generator passed in, in a fixed order, so a batch is a
//! function of that generator's seed alone.

use anyhow::{Result, ensure};
use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use super::preprocess::PreprocessedCt;
use crate::model::PairBatch;
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AugmentConfig {
    pub p_blur_or_sharpen: f64,
    pub p_blur: f64,
    pub blur_sigma: (f64, f64),
    pub sharpen_sigma: (f64, f64),
    pub sharpen_alpha: (f64, f64),
    pub sharpen_inner_sigma: f64,
    pub p_noise: f64,
    pub noise_sigma_hu: (f64, f64),
    pub p_random_window: f64,
    pub window_lo: (f64, f64),
    pub window_hi: (f64, f64),
    pub default_window: (f64, f64),
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            p_blur_or_sharpen: 0.5,
            p_blur: 0.5,
            blur_sigma: (0.25, 1.5),
            sharpen_sigma: (0.5, 1.0),
            sharpen_alpha: (10.0, 30.0),
            sharpen_inner_sigma: 0.5,
            p_noise: 0.5,
            noise_sigma_hu: (0.0, 30.0),
            p_random_window: 0.8,
            window_lo: (-1350.0, -1000.0),
            window_hi: (300.0, 1000.0),
            default_window: (-1350.0, 1000.0),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    pub pairs: usize,
    pub patch: [usize; 3],
    pub max_voxels: usize,
    pub augment: AugmentConfig,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { pairs: 10, patch: [128, 128, 32], max_voxels: 1024, augment: AugmentConfig::default() }
    }
}

/// A preprocessed CT ready for sampling: the body mask as booleans beside the index list.
pub struct SampleSource<'a> {
    pub ct: &'a PreprocessedCt,
    pub mask: &'a [bool],
}

fn uniform(rng: &mut StdRng, r: (f64, f64)) -> f64 {
    if r.1 > r.0 { rng.random_range(r.0..r.1) } else { r.0 }
}

/// scipy's Gaussian kernel: radius int(4σ + 0.5), normalised.
pub fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let w: Vec<f64> = (-radius..=radius).map(|x| (-0.5 * (x * x) as f64 / (sigma * sigma)).exp()).collect();
    let s: f64 = w.iter().sum();
    w.iter().map(|v| (v / s) as f32).collect()
}

/// scipy "reflect" (half-sample symmetric) index.
fn reflect(mut i: i64, n: i64) -> usize {
    loop {
        if i < 0 {
            i = -i - 1;
        } else if i >= n {
            i = 2 * n - i - 1;
        } else {
            return i as usize;
        }
    }
}

/// gaussian_filter1d along axis `axis` (0 = x or 1 = y) of a [X, Y, Z] patch, in place.
pub fn gaussian_filter_axis(data: &mut [f32], shape: [usize; 3], axis: usize, sigma: f64) {
    let k = gaussian_kernel(sigma);
    let r = (k.len() / 2) as i64;
    let n = shape[axis] as i64;
    let stride = if axis == 0 { shape[1] * shape[2] } else { shape[2] };
    let (outer, inner) = if axis == 0 { (1, shape[1] * shape[2]) } else { (shape[0], shape[2]) };
    let block = n as usize * stride;
    let mut line = vec![0.0f32; n as usize * inner];
    for o in 0..outer {
        let base = o * block;
        line.copy_from_slice(&data[base..base + n as usize * inner]);
        for i in 0..n {
            let dst = &mut data[base + i as usize * stride..base + i as usize * stride + inner];
            dst.fill(0.0);
            for (t, &w) in k.iter().enumerate() {
                let src = reflect(i + t as i64 - r, n) * inner;
                for (d, &s) in dst.iter_mut().zip(&line[src..src + inner]) {
                    *d += w * s;
                }
            }
        }
    }
}

/// Blur in the axial plane (x then y).
pub fn blur_xy(data: &mut [f32], shape: [usize; 3], sigma: f64) {
    gaussian_filter_axis(data, shape, 0, sigma);
    gaussian_filter_axis(data, shape, 1, sigma);
}

/// The intensity augmentations of one view (HU in, [0, 1] out), drawing from `rng`.
pub fn augment_view(x: &mut [f32], shape: [usize; 3], a: &AugmentConfig, rng: &mut StdRng) {
    if rng.random_bool(a.p_blur_or_sharpen) {
        if rng.random_bool(a.p_blur) {
            blur_xy(x, shape, uniform(rng, a.blur_sigma));
        } else {
            let s1 = uniform(rng, a.sharpen_sigma);
            let alpha = uniform(rng, a.sharpen_alpha) as f32;
            blur_xy(x, shape, s1);
            let mut bb = x.to_vec();
            blur_xy(&mut bb, shape, a.sharpen_inner_sigma);
            for (v, &b2) in x.iter_mut().zip(&bb) {
                *v += alpha * (*v - b2);
            }
        }
    }
    if rng.random_bool(a.p_noise) {
        let sigma = uniform(rng, a.noise_sigma_hu) as f32;
        let mut fast = SmallRng::seed_from_u64(rng.random());
        for v in x.iter_mut() {
            let z: f32 = StandardNormal.sample(&mut fast);
            *v += sigma * z;
        }
    }
    let (lo, hi) = if rng.random_bool(a.p_random_window) {
        (uniform(rng, a.window_lo), uniform(rng, a.window_hi))
    } else {
        a.default_window
    };
    let (lo, scale) = (lo as f32, 1.0 / (hi - lo) as f32);
    for v in x.iter_mut() {
        *v = ((*v - lo) * scale).clamp(0.0, 1.0);
    }
}

/// Start of a patch of size p along an axis of size n containing index a, uniform among valid starts.
fn patch_start(rng: &mut StdRng, a: usize, p: usize, n: usize) -> usize {
    let lo = (a + 1).saturating_sub(p);
    let hi = a.min(n - p);
    rng.random_range(lo..=hi)
}

fn crop_patch(ct: &PreprocessedCt, start: [usize; 3], p: [usize; 3]) -> Vec<f32> {
    let s = ct.shape;
    let mut out = Vec::with_capacity(p.iter().product());
    for x in start[0]..start[0] + p[0] {
        for y in start[1]..start[1] + p[1] {
            let b = (x * s[1] + y) * s[2] + start[2];
            out.extend(ct.hu[b..b + p[2]].iter().map(|&v| v as f32));
        }
    }
    out
}

/// One pretraining batch from one CT.
pub fn sample_batch(src: &SampleSource, cfg: &SamplerConfig, rng: &mut StdRng) -> Result<PairBatch> {
    sample_batch_with_boxes(src, cfg, rng).map(|(b, _)| b)
}

/// `sample_batch`, also returning each pair's two patch starts (volume coordinates).
pub fn sample_batch_with_boxes(
    src: &SampleSource,
    cfg: &SamplerConfig,
    rng: &mut StdRng,
) -> Result<(PairBatch, Vec<[[usize; 3]; 2]>)> {
    let ct = src.ct;
    let (s, p) = (ct.shape, cfg.patch);
    ensure!(s.iter().zip(&p).all(|(n, p)| n >= p), "volume {s:?} is smaller than the patch {p:?}");
    ensure!(!ct.body.is_empty(), "empty body mask");
    let sp: usize = p.iter().product();
    let mut x1 = Vec::with_capacity(cfg.pairs * sp);
    let mut x2 = Vec::with_capacity(cfg.pairs * sp);
    let (mut batch_index, mut voxels_1, mut voxels_2) = (Vec::new(), Vec::new(), Vec::new());
    let mut boxes = Vec::with_capacity(cfg.pairs);
    for b in 0..cfg.pairs {
        let a = ct.body[rng.random_range(0..ct.body.len())] as usize;
        let anchor = [a / (s[1] * s[2]), (a / s[2]) % s[1], a % s[2]];
        let mut starts = [[0usize; 3]; 2];
        for st in starts.iter_mut() {
            for ax in 0..3 {
                st[ax] = patch_start(rng, anchor[ax], p[ax], s[ax]);
            }
        }
        boxes.push(starts);
        for (view, out) in [(0, &mut x1), (1, &mut x2)] {
            let mut patch = crop_patch(ct, starts[view], p);
            augment_view(&mut patch, p, &cfg.augment, rng);
            out.extend_from_slice(&patch);
        }
        // Body voxels inside both boxes.
        let lo: Vec<usize> = (0..3).map(|ax| starts[0][ax].max(starts[1][ax])).collect();
        let hi: Vec<usize> = (0..3).map(|ax| (starts[0][ax] + p[ax]).min(starts[1][ax] + p[ax])).collect();
        let mut common = Vec::new();
        for x in lo[0]..hi[0] {
            for y in lo[1]..hi[1] {
                for z in lo[2]..hi[2] {
                    if src.mask[(x * s[1] + y) * s[2] + z] {
                        common.push([x, y, z]);
                    }
                }
            }
        }
        if common.len() > cfg.max_voxels {
            // Partial Fisher–Yates: a uniform subset without replacement.
            for i in 0..cfg.max_voxels {
                let j = rng.random_range(i..common.len());
                common.swap(i, j);
            }
            common.truncate(cfg.max_voxels);
        }
        for w in common {
            batch_index.push(b as i64);
            voxels_1.extend((0..3).map(|ax| (w[ax] - starts[0][ax]) as i64));
            voxels_2.extend((0..3).map(|ax| (w[ax] - starts[1][ax]) as i64));
        }
    }
    let shape = [cfg.pairs, p[0], p[1], p[2], 1];
    Ok((
        PairBatch {
            x1: Tensor::from_f32(&shape, x1),
            x2: Tensor::from_f32(&shape, x2),
            batch_index,
            voxels_1,
            voxels_2,
        },
        boxes,
    ))
}
