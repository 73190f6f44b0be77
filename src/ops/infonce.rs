//! The vox2vec InfoNCE loss (docs/method.md §4) on L2-normalised embeddings e1, e2 [N, D].
//!
//!   l11 = e1 e1ᵀ / t (diagonal −∞), l22 = e2 e2ᵀ / t (diagonal −∞), l12 = e1 e2ᵀ / t
//!   loss_1 = mean_i( −l12[i,i] + logsumexp( l11[i,:] ‖ l12[i,:] ) )
//!   loss_2 = mean_i( −l12[i,i] + logsumexp( l12[:,i] ‖ l22[i,:] ) )
//!   loss   = (loss_1 + loss_2) / 2
//!
//! With P1 = the row softmax of [l11 ‖ l12] (blocks A, B) and P2 = the row softmax of
//! [l21 ‖ l22] (blocks C, D, l21 = l12ᵀ), the gradients with respect to the logits are
//!   G11 = A / 2N, G22 = D / 2N, G12 = (B + Cᵀ) / 2N − I / N,
//! and de1 = ((G11 + G11ᵀ) e1 + G12 e2) / t, de2 = ((G22 + G22ᵀ) e2 + G12ᵀ e1) / t.
//!
//! CPU: the three N×N similarity GEMMs in f32 (multi-threaded), log-sum-exps in f64. The
//! logit matrices are overwritten in place by the gradient matrices (4 N² floats in all).
//! This is the oracle of the device path (`cuda::ops::infonce`), which computes the same
//! thing flash-style from per-row log-sum-exps, without any N×N matrix.

use anyhow::{Result, ensure};
use rayon::prelude::*;

use crate::autograd::{Graph, Var};
use crate::cpu::{Mat, par_gemm};
use crate::ops::linear::MatmulMath;
use crate::tensor::Tensor;

pub const DEFAULT_TEMPERATURE: f64 = 0.1;

fn gram(a: &[f32], b: &[f32], n: usize, d: usize) -> Vec<f32> {
    let mut s = vec![0.0f32; n * n];
    par_gemm(n, d, n, Mat::rows(a, d), Mat::rows_t(b, d), 0.0, &mut s);
    s
}

/// Row-wise softmax over the concatenation of row i of `left` and row i of `right` (both
/// N×N, scaled by 1/t, with the diagonal of the matrices flagged in `mask_*` excluded),
/// in place; returns Σ_i logsumexp_i.
fn joint_softmax_rows(left: &mut [f32], right: &mut [f32], n: usize, t: f64, mask_left: bool, mask_right: bool) -> f64 {
    left.par_chunks_mut(n)
        .zip(right.par_chunks_mut(n))
        .enumerate()
        .map(|(i, (l, r))| {
            let mut mx = f64::NEG_INFINITY;
            for (j, &v) in l.iter().enumerate() {
                if !(mask_left && j == i) {
                    mx = mx.max(v as f64 / t);
                }
            }
            for (j, &v) in r.iter().enumerate() {
                if !(mask_right && j == i) {
                    mx = mx.max(v as f64 / t);
                }
            }
            let mut sum = 0.0f64;
            for (j, v) in l.iter().enumerate() {
                if !(mask_left && j == i) {
                    sum += (*v as f64 / t - mx).exp();
                }
            }
            for (j, v) in r.iter().enumerate() {
                if !(mask_right && j == i) {
                    sum += (*v as f64 / t - mx).exp();
                }
            }
            let lse = mx + sum.ln();
            for (j, v) in l.iter_mut().enumerate() {
                *v = if mask_left && j == i { 0.0 } else { (*v as f64 / t - lse).exp() as f32 };
            }
            for (j, v) in r.iter_mut().enumerate() {
                *v = if mask_right && j == i { 0.0 } else { (*v as f64 / t - lse).exp() as f32 };
            }
            lse
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum()
}

/// Returns (loss, de1, de2).
pub fn infonce_cpu(e1: &[f32], e2: &[f32], n: usize, d: usize, t: f64) -> (f64, Vec<f32>, Vec<f32>) {
    let mut s11 = gram(e1, e1, n, d);
    let mut s12 = gram(e1, e2, n, d);
    let mut s21 = gram(e2, e1, n, d);
    let mut s22 = gram(e2, e2, n, d);
    let diag: f64 = (0..n).map(|i| s12[i * n + i] as f64 / t).sum();
    // s11 ← A, s12 ← B (rows of [l11 ‖ l12]); s21 ← C, s22 ← D (rows of [l21 ‖ l22]).
    let lse1 = joint_softmax_rows(&mut s11, &mut s12, n, t, true, false);
    let lse2 = joint_softmax_rows(&mut s21, &mut s22, n, t, false, true);
    let nf = n as f64;
    let loss = ((lse1 - diag) / nf + (lse2 - diag) / nf) / 2.0;
    // Gradient matrices with respect to the logits, already divided by t:
    // g11 = (A + Aᵀ) / (2N t), g22 = (D + Dᵀ) / (2N t), g12 = ((B + Cᵀ) / 2N − I / N) / t.
    let k = (1.0 / (2.0 * nf * t)) as f32;
    let sym = |a: &[f32]| -> Vec<f32> {
        let mut out = vec![0.0f32; n * n];
        out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            for j in 0..n {
                row[j] = (a[i * n + j] + a[j * n + i]) * k;
            }
        });
        out
    };
    let g11 = sym(&s11);
    drop(s11);
    let g22 = sym(&s22);
    drop(s22);
    let mut g12 = vec![0.0f32; n * n];
    let diag_term = (1.0 / (nf * t)) as f32;
    g12.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for j in 0..n {
            row[j] = (s12[i * n + j] + s21[j * n + i]) * k - if i == j { diag_term } else { 0.0 };
        }
    });
    drop((s12, s21));
    let mut de1 = vec![0.0f32; n * d];
    par_gemm(n, n, d, Mat::rows(&g11, n), Mat::rows(e1, d), 0.0, &mut de1);
    par_gemm(n, n, d, Mat::rows(&g12, n), Mat::rows(e2, d), 1.0, &mut de1);
    let mut de2 = vec![0.0f32; n * d];
    par_gemm(n, n, d, Mat::rows(&g22, n), Mat::rows(e2, d), 0.0, &mut de2);
    par_gemm(n, n, d, Mat::rows_t(&g12, n), Mat::rows(e1, d), 1.0, &mut de2);
    (loss, de1, de2)
}

/// InfoNCE as an autograd op; returns a scalar of shape [1]. Exact fp32 on every device.
pub fn infonce(g: &Graph, e1: &Var, e2: &Var, temperature: f64) -> Result<Var> {
    infonce_with(g, e1, e2, temperature, MatmulMath::Fp32)
}

/// `infonce` with the similarities multiplied as `math` says on the device: `Tf32` lets the
/// GPU take its tensor-core kernels (bf16x3 products, within ~1e-5 of fp32 in the logits);
/// the CPU is always exact.
pub fn infonce_with(g: &Graph, e1: &Var, e2: &Var, temperature: f64, math: MatmulMath) -> Result<Var> {
    ensure!(
        e1.shape().len() == 2 && e1.shape() == e2.shape(),
        "infonce: embeddings {:?} and {:?} must be equal [N, D]",
        e1.shape(),
        e2.shape()
    );
    let (n, d) = (e1.shape()[0], e1.shape()[1]);
    ensure!(n >= 2, "infonce: needs at least 2 positive pairs, found {n}");
    if e1.value.is_cuda() {
        // Flash-style on the device: the forward keeps 2N log-sum-exps, the backward
        // recomputes the similarity tiles from e1 and e2 (no N x N matrix at any time).
        use crate::cuda::ops::infonce as dev;
        let (loss, lse) = dev::forward(&e1.value, &e2.value, n, d, temperature, math == MatmulMath::Tf32)?;
        let saved = g.needs_grad(&[e1, e2]).then(|| (e1.value.clone(), e2.value.clone(), lse));
        return Ok(g.record("infonce", loss, &[e1, e2], move |dl| {
            let (a, b, lse) = saved.expect("saved for backward");
            let dl = crate::cuda::cast(&dl.to_device(a.device())?, crate::tensor::DType::F32)?;
            let (da, db) = dev::backward(&a, &b, &lse, &dl, n, d, temperature)?;
            Ok(vec![Some(da), Some(db)])
        }));
    }
    let (loss, de1, de2) = infonce_cpu(e1.value.f32s(), e2.value.f32s(), n, d, temperature);
    let grads = g.needs_grad(&[e1, e2]).then_some((de1, de2));
    Ok(g.record("infonce", Tensor::from_f32(&[1], vec![loss as f32]), &[e1, e2], move |dl| {
        let s = dl.f32s()[0];
        let (mut a, mut b) = grads.expect("saved gradients");
        if s != 1.0 {
            a.iter_mut().chain(b.iter_mut()).for_each(|v| *v *= s);
        }
        Ok(vec![Some(Tensor::from_f32(&[n, d], a)), Some(Tensor::from_f32(&[n, d], b))])
    }))
}

/// Anchors per view whose nearest neighbour the learning signal checks (all N when fewer).
pub const SIGNAL_ANCHORS: usize = 1024;

/// How well a batch's embeddings already do what InfoNCE asks, besides the loss: logged every
/// step (`metrics.jsonl`) and on validation pairs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Signal {
    /// Contrastive top-1 accuracy: for the first min(N, SIGNAL_ANCHORS) voxels of each view,
    /// the fraction whose most similar embedding in the other view is its own pair (strictly
    /// more similar than every other voxel's: a collapsed embedding scores 0, not 1).
    pub top1: f64,
    /// Mean cosine similarity of positive pairs, e1_i · e2_i over all N.
    pub pos_sim: f64,
    /// Mean cosine similarity across views of non-pairs, e1_i · e2_j over all i ≠ j.
    pub neg_sim: f64,
}

/// The signal of unit rows e1, e2 [n, d] on the host. The sums are f64: pos = Σ e1_i·e2_i,
/// neg = ((Σ_i e1_i)·(Σ_j e2_j) − pos) / (n (n − 1)), an O(n d) form of the mean over i ≠ j.
pub fn signal_cpu(e1: &[f32], e2: &[f32], n: usize, d: usize) -> Signal {
    let a = n.min(SIGNAL_ANCHORS);
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum::<f64>();
    let pos: f64 = (0..n).map(|i| dot(&e1[i * d..(i + 1) * d], &e2[i * d..(i + 1) * d])).sum();
    let col_sum = |e: &[f32]| -> Vec<f64> {
        let mut s = vec![0.0f64; d];
        for row in e.chunks_exact(d) {
            s.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
        }
        s
    };
    let (s1, s2) = (col_sum(e1), col_sum(e2));
    let total: f64 = s1.iter().zip(&s2).map(|(a, b)| a * b).sum();
    // Anchors of one view against every voxel of the other: [a, n] similarities in f32 (as
    // the loss's), the anchor correct when its own pair beats every other strictly.
    let correct = |anchors: &[f32], others: &[f32]| -> usize {
        let mut s = vec![0.0f32; a * n];
        par_gemm(a, d, n, Mat::rows(&anchors[..a * d], d), Mat::rows_t(others, d), 0.0, &mut s);
        s.par_chunks(n)
            .enumerate()
            .filter(|(i, row)| row.iter().enumerate().all(|(j, &v)| j == *i || v < row[*i]))
            .count()
    };
    let hits = correct(e1, e2) + correct(e2, e1);
    let pairs = n as f64 * (n as f64 - 1.0);
    Signal {
        top1: hits as f64 / (2 * a) as f64,
        pos_sim: pos / n as f64,
        neg_sim: if n > 1 { (total - pos) / pairs } else { f64::NAN },
    }
}

/// The signal of e1, e2 where they live (on a CUDA device: `cuda::ops::infonce::signal`, one
/// small read). Unit rows expected.
pub fn signal(e1: &Tensor, e2: &Tensor) -> Result<Signal> {
    ensure!(
        e1.shape().len() == 2 && e1.shape() == e2.shape(),
        "signal: embeddings {:?} and {:?} must be equal [N, D]",
        e1.shape(),
        e2.shape()
    );
    let (n, d) = (e1.shape()[0], e1.shape()[1]);
    if e1.is_cuda() {
        return crate::cuda::ops::infonce::signal(e1, e2, n, d)?.read();
    }
    Ok(signal_cpu(e1.f32s(), e2.f32s(), n, d))
}

#[cfg(test)]
mod signal_tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The definition, literally: nearest neighbour by brute force, means over all pairs.
    fn brute(e1: &[f32], e2: &[f32], n: usize, d: usize) -> Signal {
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&x, &y)| x * y).sum::<f32>();
        let row = |e: &[f32], i: usize| e[i * d..(i + 1) * d].to_vec();
        let a = n.min(SIGNAL_ANCHORS);
        let mut hits = 0;
        for (p, q) in [(e1, e2), (e2, e1)] {
            for i in 0..a {
                let own = dot(&row(p, i), &row(q, i));
                hits += (0..n).filter(|&j| j != i).all(|j| dot(&row(p, i), &row(q, j)) < own) as usize;
            }
        }
        let (mut pos, mut neg) = (0.0f64, 0.0f64);
        for i in 0..n {
            for j in 0..n {
                let s = dot(&row(e1, i), &row(e2, j)) as f64;
                if i == j { pos += s } else { neg += s }
            }
        }
        Signal { top1: hits as f64 / (2 * a) as f64, pos_sim: pos / n as f64, neg_sim: neg / (n * (n - 1)) as f64 }
    }

    fn unit_rows(rng: &mut rand::rngs::StdRng, base: Option<&[f32]>, n: usize, d: usize, noise: f32) -> Vec<f32> {
        let mut v: Vec<f32> =
            (0..n * d).map(|k| base.map_or(0.0, |b| b[k]) + noise * rng.random_range(-1.0..1.0f32)).collect();
        for r in v.chunks_mut(d) {
            let s = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= s);
        }
        v
    }

    #[test]
    fn signal_matches_its_definition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for (n, d, noise) in [(7usize, 4usize, 0.3f32), (40, 16, 0.8), (130, 8, 1.5), (2, 3, 0.1)] {
            let e1 = unit_rows(&mut rng, None, n, d, 1.0);
            let e2 = unit_rows(&mut rng, Some(&e1), n, d, noise);
            let (got, want) = (signal_cpu(&e1, &e2, n, d), brute(&e1, &e2, n, d));
            assert!((got.top1 - want.top1).abs() < 1e-12, "n {n}: top-1 {} vs {}", got.top1, want.top1);
            assert!(
                (got.pos_sim - want.pos_sim).abs() < 1e-5 && (got.neg_sim - want.neg_sim).abs() < 1e-5,
                "n {n}: {got:?} vs {want:?}"
            );
        }
        // Identical pairs: every anchor finds itself; a collapsed embedding (all rows equal)
        // finds nothing (ties are not hits).
        let e = unit_rows(&mut rng, None, 50, 8, 1.0);
        assert_eq!(signal_cpu(&e, &e, 50, 8).top1, 1.0);
        let same: Vec<f32> = (0..50).flat_map(|_| e[..8].to_vec()).collect();
        let s = signal_cpu(&same, &same, 50, 8);
        assert_eq!(s.top1, 0.0);
        assert!((s.pos_sim - 1.0).abs() < 1e-6 && (s.neg_sim - 1.0).abs() < 1e-6);
    }
}
