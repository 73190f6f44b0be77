//! The vox2vec InfoNCE loss (REFERENCE.md §4) on L2-normalised embeddings e1, e2 [N, D].
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
    ensure!(e1.shape().len() == 2 && e1.shape() == e2.shape(), "infonce: embeddings {:?} and {:?} must be equal [N, D]", e1.shape(), e2.shape());
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
