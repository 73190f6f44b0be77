//! Voxel similarity search: the embedding of one voxel of a query CT against every voxel of
//! target CTs.
//!
//! A voxel's embedding is vox2vec's: the feature vectors of all pyramid levels at that voxel
//! (level l read at index i >> l, as the reference's `select_from_pyramid`), concatenated
//! (1008 values at base 16 x 6 scales) and L2-normalised. The similarity of two voxels is the
//! cosine of their embeddings. It is computed per level without building the concatenation:
//! cos(q, f(i)) = Σ_l q_l · f_l(i >> l) / (|q| · sqrt(Σ_l |f_l(i >> l)|²)).
//!
//! Points are given in a CT file's own voxel indices or in world millimetres (NIfTI's RAS);
//! both go through the world to the preprocessed grid (`embed::level_affine`), so flipped,
//! permuted or cropped copies of a CT are handled by the same arithmetic as the features.

use anyhow::{Result, ensure};

use super::sliding::LevelMap;
use crate::data::cache::CachedCt;

/// `a` applied to the point p (homogeneous coordinate 1).
pub fn apply(a: &[[f64; 4]; 4], p: [f64; 3]) -> [f64; 3] {
    std::array::from_fn(|r| a[r][0] * p[0] + a[r][1] * p[1] + a[r][2] * p[2] + a[r][3])
}

/// The inverse of an affine (None when singular).
pub fn invert(a: &[[f64; 4]; 4]) -> Option<[[f64; 4]; 4]> {
    let m = nalgebra::Matrix4::from_fn(|r, c| a[r][c]).try_inverse()?;
    Some(std::array::from_fn(|r| std::array::from_fn(|c| m[(r, c)])))
}

/// The level-0 voxel of the preprocessed grid nearest to world point `world` (mm), if it lies
/// within half a voxel of the grid.
pub fn world_to_level0(e: &CachedCt, world: [f64; 3]) -> Option<[usize; 3]> {
    let inv = invert(&super::embed::level_affine(e, 0))?;
    let p = apply(&inv, world);
    let s = e.ct.shape;
    let mut out = [0usize; 3];
    for a in 0..3 {
        let r = p[a].round();
        if !(r >= 0.0 && r < s[a] as f64) || (p[a] - r).abs() > 0.5 + 1e-6 {
            return None;
        }
        out[a] = r as usize;
    }
    Some(out)
}

/// World coordinates (mm) of level-0 voxel `i`.
pub fn level0_to_world(e: &CachedCt, i: [usize; 3]) -> [f64; 3] {
    apply(&super::embed::level_affine(e, 0), i.map(|v| v as f64))
}

/// The embedding of level-0 voxel `i`: every level's features there, concatenated (level 0
/// first) and L2-normalised. `maps` must hold levels 0, 1, ... in order.
pub fn embedding_at(maps: &[LevelMap], i: [usize; 3]) -> Result<Vec<f32>> {
    check_levels(maps)?;
    let mut v = Vec::new();
    for m in maps {
        let j = level_index(m, i);
        v.extend_from_slice(&m.values[j * m.channels..(j + 1) * m.channels]);
    }
    let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    ensure!(n > 0.0, "the embedding at {i:?} is zero");
    v.iter_mut().for_each(|x| *x = (*x as f64 / n) as f32);
    Ok(v)
}

/// Cosine similarity of `query` (an `embedding_at` vector of the same model) with every
/// level-0 voxel of `maps`, [X, Y, Z] on the level-0 grid.
pub fn similarity_map(maps: &[LevelMap], query: &[f32]) -> Result<Vec<f32>> {
    check_levels(maps)?;
    let total: usize = maps.iter().map(|m| m.channels).sum();
    ensure!(query.len() == total, "a query of {} values against an embedding of {total}", query.len());
    // Per level and level voxel: q_l · f_l(j) and |f_l(j)|².
    let mut dots = Vec::with_capacity(maps.len());
    let mut off = 0;
    for m in maps {
        let q = &query[off..off + m.channels];
        off += m.channels;
        let (d, n): (Vec<f64>, Vec<f64>) = m
            .values
            .chunks_exact(m.channels)
            .map(|f| {
                (
                    f.iter().zip(q).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>(),
                    f.iter().map(|a| (*a as f64).powi(2)).sum::<f64>(),
                )
            })
            .unzip();
        dots.push((d, n));
    }
    let s0 = maps[0].shape;
    let mut out = vec![0.0f32; s0.iter().product()];
    for x in 0..s0[0] {
        for y in 0..s0[1] {
            for z in 0..s0[2] {
                let (mut dot, mut norm) = (0.0f64, 0.0f64);
                for (m, (d, n)) in maps.iter().zip(&dots) {
                    let j = level_index(m, [x, y, z]);
                    dot += d[j];
                    norm += n[j];
                }
                out[(x * s0[1] + y) * s0[2] + z] = if norm > 0.0 { (dot / norm.sqrt()) as f32 } else { 0.0 };
            }
        }
    }
    Ok(out)
}

/// The voxel of highest value among those where `mask` is true (the first on ties).
pub fn best(values: &[f32], mask: &[bool], shape: [usize; 3]) -> Option<([usize; 3], f32)> {
    let i = (0..values.len()).filter(|&i| mask[i]).max_by(|&a, &b| values[a].total_cmp(&values[b]).then(b.cmp(&a)))?;
    Some(([i / (shape[1] * shape[2]), (i / shape[2]) % shape[1], i % shape[2]], values[i]))
}

fn level_index(m: &LevelMap, i: [usize; 3]) -> usize {
    let f = m.level;
    let [x, y, z] = [(i[0] >> f).min(m.shape[0] - 1), (i[1] >> f).min(m.shape[1] - 1), (i[2] >> f).min(m.shape[2] - 1)];
    (x * m.shape[1] + y) * m.shape[2] + z
}

fn check_levels(maps: &[LevelMap]) -> Result<()> {
    ensure!(
        !maps.is_empty() && maps.iter().enumerate().all(|(k, m)| m.level == k),
        "similarity needs every pyramid level from 0 in order"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(level: usize, shape: [usize; 3], channels: usize, f: impl Fn(usize) -> f32) -> LevelMap {
        let n = shape.iter().product::<usize>() * channels;
        LevelMap { level, shape, channels, values: (0..n).map(f).collect() }
    }

    /// The per-level formula equals the cosine of the explicit concatenations, and a voxel is
    /// most similar to itself.
    #[test]
    fn similarity_is_the_cosine_of_concatenated_levels() {
        let maps = vec![
            map(0, [6, 5, 4], 3, |i| ((i * 37 % 101) as f32 - 50.0) / 7.0),
            map(1, [3, 3, 2], 5, |i| ((i * 53 % 97) as f32 - 40.0) / 11.0),
        ];
        let q = embedding_at(&maps, [4, 2, 1]).unwrap();
        let sim = similarity_map(&maps, &q).unwrap();
        for x in 0..6 {
            for y in 0..5 {
                for z in 0..4 {
                    let e = embedding_at(&maps, [x, y, z]).unwrap();
                    let cos: f32 = e.iter().zip(&q).map(|(a, b)| a * b).sum();
                    assert!((cos - sim[(x * 5 + y) * 4 + z]).abs() < 1e-5);
                }
            }
        }
        let all = vec![true; sim.len()];
        let (at, s) = best(&sim, &all, [6, 5, 4]).unwrap();
        assert_eq!(at, [4, 2, 1]);
        assert!((s - 1.0).abs() < 1e-5);
        // Masked out, the best is elsewhere.
        let mut mask = all.clone();
        mask[(4 * 5 + 2) * 4 + 1] = false;
        assert_ne!(best(&sim, &mask, [6, 5, 4]).unwrap().0, [4, 2, 1]);
    }
}
