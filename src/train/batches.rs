//! Pretraining batches outside the sampler: their shape, synthetic two-view batches for runs
//! and benchmarks without CT, and batches written out for PyTorch's trajectory check.

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::PairBatch;
use crate::tensor::Tensor;

/// Shape of a pretraining batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    pub pairs: usize,
    pub patch: [usize; 3],
    pub voxels_per_pair: usize,
}

impl Default for BatchShape {
    fn default() -> Self {
        BatchShape { pairs: 10, patch: [128, 128, 32], voxels_per_pair: 1024 }
    }
}

/// Synthetic two-view batches: a smooth random volume per patch pair, two overlapping crops
/// of it with independent intensity jitter, and positive pairs at the same volume voxel in
/// both crops. The same (seed, index) always gives the same batch. Not CT: a stand-in that
/// exercises the whole step with a loss that can fall.
pub fn synthetic_batch(shape: BatchShape, seed: u64, index: u64) -> PairBatch {
    let mut rng = StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let [px, py, pz] = shape.patch;
    let shift = [px / 4, py / 4, pz / 4];
    let (vx, vy, vz) = (px + shift[0], py + shift[1], pz + shift[2]);
    let b = shape.pairs;
    let sp = px * py * pz;
    let mut x1 = vec![0.0f32; b * sp];
    let mut x2 = vec![0.0f32; b * sp];
    let mut batch_index = Vec::new();
    let mut voxels_1 = Vec::new();
    let mut voxels_2 = Vec::new();
    for p in 0..b {
        // A sum of random blobs, so the volume has structure at several scales.
        let blobs: Vec<[f32; 5]> = (0..12)
            .map(|_| {
                [
                    rng.random_range(0.0..vx as f32),
                    rng.random_range(0.0..vy as f32),
                    rng.random_range(0.0..vz as f32),
                    rng.random_range(2.0..(px as f32 / 3.0).max(3.0)),
                    rng.random_range(-1.0..1.0),
                ]
            })
            .collect();
        let value = |x: usize, y: usize, z: usize| -> f32 {
            let mut s = 0.5;
            for bl in &blobs {
                let d2 = (x as f32 - bl[0]).powi(2) + (y as f32 - bl[1]).powi(2) + (2.0 * (z as f32 - bl[2])).powi(2);
                s += 0.5 * bl[4] * (-d2 / (2.0 * bl[3] * bl[3])).exp();
            }
            s
        };
        let o1: [usize; 3] =
            [rng.random_range(0..=shift[0]), rng.random_range(0..=shift[1]), rng.random_range(0..=shift[2])];
        let o2: [usize; 3] =
            [rng.random_range(0..=shift[0]), rng.random_range(0..=shift[1]), rng.random_range(0..=shift[2])];
        for (dst, o) in [(&mut x1, o1), (&mut x2, o2)] {
            let gain = rng.random_range(0.8..1.2f32);
            for x in 0..px {
                for y in 0..py {
                    for z in 0..pz {
                        let noise = rng.random_range(-0.02..0.02f32);
                        dst[p * sp + (x * py + y) * pz + z] =
                            (value(x + o[0], y + o[1], z + o[2]) * gain + noise).clamp(0.0, 1.0);
                    }
                }
            }
        }
        for _ in 0..shape.voxels_per_pair {
            // A volume voxel inside both crops.
            let w: Vec<usize> =
                (0..3).map(|a| rng.random_range(o1[a].max(o2[a])..(o1[a].min(o2[a]) + shape.patch[a]))).collect();
            batch_index.push(p as i64);
            voxels_1.extend((0..3).map(|a| (w[a] - o1[a]) as i64));
            voxels_2.extend((0..3).map(|a| (w[a] - o2[a]) as i64));
        }
    }
    let s = [b, px, py, pz, 1];
    PairBatch { x1: Tensor::from_f32(&s, x1), x2: Tensor::from_f32(&s, x2), batch_index, voxels_1, voxels_2 }
}

/// Batch `step` (1-based) as files PyTorch reads (`dev/trajectory.py`): `step_<n>.npz`-like
/// folder `<dir>/step_<n>/` with x1.npy, x2.npy ([B, 1, X, Y, Z] float32, PyTorch's layout) and
/// pairs.npy ([N, 7] int64: patch index, view-1 x, y, z, view-2 x, y, z).
pub fn dump_batch(dir: &std::path::Path, step: u64, b: &PairBatch) -> Result<()> {
    use anyhow::Context;
    let d = dir.join(format!("step_{step:06}"));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let s = b.x1.shape();
    let ncxyz = [s[0], 1, s[1], s[2], s[3]];
    crate::eval::npy::write_f32(&d.join("x1.npy"), &ncxyz, &b.x1.to_f32_vec()?)?;
    crate::eval::npy::write_f32(&d.join("x2.npy"), &ncxyz, &b.x2.to_f32_vec()?)?;
    let n = b.num_pairs();
    let mut pairs = Vec::with_capacity(n * 7);
    for i in 0..n {
        pairs.push(b.batch_index[i]);
        pairs.extend_from_slice(&b.voxels_1[3 * i..3 * i + 3]);
        pairs.extend_from_slice(&b.voxels_2[3 * i..3 * i + 3]);
    }
    crate::eval::npy::write_i64(&d.join("pairs.npy"), &[n, 7], &pairs)
}
