//! Batch normalisation over the last (channel) axis: BatchNorm3d on [N, X, Y, Z, C] and
//! BatchNorm1d on [N, C] are the same op on the input viewed as rows [M, C].
//!
//! Train mode: mean and biased variance over the M rows (accumulated in f64, two passes),
//! y = (x - mean) / sqrt(var + eps) · γ + β; running statistics are updated as PyTorch does,
//! running = (1 - momentum) · running + momentum · batch, with the *unbiased* variance
//! var · M / (M - 1), and num_batches_tracked += 1. Eval mode: running statistics.
//!
//! Backward (train), with x̂ = (x - mean) · invstd:
//!   dβ = Σ dy, dγ = Σ dy · x̂, dx = γ · invstd / M · (M · dy - dβ - x̂ · dγ).
//! Backward (eval): dx = dy · γ · invstd, same dγ and dβ.
//! Statistics and per-channel coefficients in f64; the per-element work in f32 (vectorised),
//! on mean-centred values. Outputs are written (=).

use anyhow::{Result, ensure};

use crate::autograd::{Graph, Var};
use crate::cpu::par_reduce_rows;
use crate::tensor::Tensor;

pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// Per-channel statistics used to normalise.
pub struct BnStats {
    pub mean: Vec<f64>,
    pub invstd: Vec<f64>,
    /// Biased batch variance (train mode only; empty in eval mode).
    pub var: Vec<f64>,
}

/// Batch mean and biased variance of x viewed as [M, C].
pub fn batch_stats_cpu(x: &[f32], c: usize, eps: f64) -> BnStats {
    let m = x.len() / c;
    let sum = par_reduce_rows(m, c, |r, acc| {
        for row in x[r.start * c..r.end * c].chunks_exact(c) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
    });
    let mean: Vec<f64> = sum.iter().map(|s| s / m as f64).collect();
    let sq = par_reduce_rows(m, c, |r, acc| {
        for row in x[r.start * c..r.end * c].chunks_exact(c) {
            for ((a, &v), mu) in acc.iter_mut().zip(row).zip(&mean) {
                let d = v as f64 - mu;
                *a += d * d;
            }
        }
    });
    let var: Vec<f64> = sq.iter().map(|s| s / m as f64).collect();
    let invstd = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    BnStats { mean, invstd, var }
}

/// Rows per f32 partial sum in the reductions below: short enough that f32 keeps full
/// precision on mean-centred values, long enough to vectorise; partials are summed in f64.
const F32_BLOCK_ROWS: usize = 256;

/// y = (x - mean) · (invstd · γ) + β, rows of width c; elementwise in f32 (as PyTorch).
pub fn bn_apply_cpu(x: &[f32], c: usize, st: &BnStats, gamma: &[f32], beta: &[f32]) -> Vec<f32> {
    bn_apply_then(x, c, st, gamma, beta, |v| v)
}

/// `bn_apply_cpu` with `post` applied to each value as it is written (ReLU for
/// `batch_norm_relu`): the same f32 operations, then `post`.
fn bn_apply_then(
    x: &[f32],
    c: usize,
    st: &BnStats,
    gamma: &[f32],
    beta: &[f32],
    post: impl Fn(f32) -> f32 + Sync + Send,
) -> Vec<f32> {
    let scale: Vec<f32> = (0..c).map(|j| (st.invstd[j] * gamma[j] as f64) as f32).collect();
    let mean: Vec<f32> = st.mean.iter().map(|&m| m as f32).collect();
    let rows = (1usize << 14).div_ceil(c).max(1) * c;
    crate::cpu::par_build(x.len(), rows, |i, yb| {
        for (yr, xr) in yb.chunks_exact_mut(c).zip(x[i * rows..].chunks_exact(c)) {
            for ((y, &x), ((&mu, &s), &b)) in yr.iter_mut().zip(xr).zip(mean.iter().zip(&scale).zip(beta)) {
                *y = post((x - mu) * s + b);
            }
        }
    })
}

/// BN → ReLU of eval mode as per-channel f32 constants, applied element by element exactly as
/// `bn_apply_cpu` and then ReLU would be (the same f32 operations in the same order), so that
/// a fused consumer produces bit-identical values to the composition.
#[derive(Clone, Debug)]
pub struct BnReluEval {
    pub mean: Vec<f32>,
    pub scale: Vec<f32>,
    pub beta: Vec<f32>,
}

impl BnReluEval {
    /// From the running statistics and γ, β (host tensors).
    pub fn new(running_mean: &[f32], running_var: &[f32], gamma: &[f32], beta: &[f32]) -> BnReluEval {
        let mean = running_mean.to_vec();
        let scale = running_var
            .iter()
            .zip(gamma)
            .map(|(&v, &g)| ((1.0 / (v as f64 + BN_EPS).sqrt()) * g as f64) as f32)
            .collect();
        BnReluEval { mean, scale, beta: beta.to_vec() }
    }

    /// The same constants repeated `times` times: `apply_row` then takes `times` voxels (a
    /// line of channels-last data) in one vectorised loop, with the same values per element.
    pub fn tiled(&self, times: usize) -> BnReluEval {
        let rep = |v: &Vec<f32>| v.iter().copied().cycle().take(v.len() * times).collect();
        BnReluEval { mean: rep(&self.mean), scale: rep(&self.scale), beta: rep(&self.beta) }
    }

    /// max((x − mean) · scale + β, 0) for one row of channels.
    #[inline]
    pub fn apply_row(&self, src: &[f32], dst: &mut [f32]) {
        // Zipped slices of one length (no indexing, no bounds checks): the loop vectorises.
        let n = src.len().min(dst.len()).min(self.mean.len());
        let params = self.mean[..n].iter().zip(&self.scale[..n]).zip(&self.beta[..n]);
        for ((d, &x), ((&m, &s), &b)) in dst[..n].iter_mut().zip(&src[..n]).zip(params) {
            *d = ((x - m) * s + b).max(0.0);
        }
    }

    /// The whole [M, C] tensor (C = the number of channels).
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let c = self.mean.len();
        let rows = (1usize << 14).div_ceil(c).max(1) * c;
        crate::cpu::par_build(x.len(), rows, |i, yb| {
            for (yr, xr) in yb.chunks_exact_mut(c).zip(x[i * rows..].chunks_exact(c)) {
                self.apply_row(xr, yr);
            }
        })
    }
}

/// (dx, dγ, dβ). `train` selects the batch-statistics backward.
pub fn bn_backward_cpu(
    x: &[f32],
    dy: &[f32],
    c: usize,
    st: &BnStats,
    gamma: &[f32],
    train: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    bn_backward_masked_cpu(x, dy, None, c, st, gamma, train)
}

/// `bn_backward_cpu` of dy·[relu_out > 0] (`relu_out` the output of relu(bn(x)), as
/// `relu_backward_cpu` masks): the gradient of relu(bn(x)) without a masked copy of the whole
/// dy (each block of rows is masked into a block-local buffer, in cache, just before use),
/// the same values as the composition.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward_masked_cpu(
    x: &[f32],
    dy: &[f32],
    relu_out: Option<&[f32]>,
    c: usize,
    st: &BnStats,
    gamma: &[f32],
    train: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let m = x.len() / c;
    // dy of rows r0.., masked as relu's backward does, into `buf` (or dy itself unmasked).
    let rows_of = |r0: usize, n: usize, buf: &'_ mut Vec<f32>| -> Option<()> {
        let y = relu_out?;
        buf.clear();
        buf.extend(
            dy[r0 * c..(r0 + n) * c].iter().zip(&y[r0 * c..(r0 + n) * c]).map(|(&g, &y)| if y > 0.0 { g } else { 0.0 }),
        );
        Some(())
    };
    let mean: Vec<f32> = st.mean.iter().map(|&v| v as f32).collect();
    // acc[0..c] = Σ dy, acc[c..2c] = Σ dy · (x − mean); f32 within blocks of rows, f64 across.
    let acc = par_reduce_rows(m, 2 * c, |r, acc| {
        let mut part = vec![0.0f32; 2 * c];
        let mut gm = Vec::new();
        for (b, (bx, bg)) in x[r.start * c..r.end * c]
            .chunks(F32_BLOCK_ROWS * c)
            .zip(dy[r.start * c..r.end * c].chunks(F32_BLOCK_ROWS * c))
            .enumerate()
        {
            part.fill(0.0);
            let (sg, sgx) = part.split_at_mut(c);
            let bg = match rows_of(r.start + b * F32_BLOCK_ROWS, bx.len() / c, &mut gm) {
                Some(()) => &gm[..],
                None => bg,
            };
            for (xr, gr) in bx.chunks_exact(c).zip(bg.chunks_exact(c)) {
                // Zipped slices of one length: no bounds checks, the loop vectorises.
                for (((s, sx), (&g, &x)), &mu) in sg.iter_mut().zip(sgx.iter_mut()).zip(gr.iter().zip(xr)).zip(&mean) {
                    *s += g;
                    *sx += g * (x - mu);
                }
            }
            for (a, &p) in acc.iter_mut().zip(part.iter()) {
                *a += p as f64;
            }
        }
    });
    let (dbeta, sum_gx) = acc.split_at(c);
    let dgamma: Vec<f64> = (0..c).map(|j| sum_gx[j] * st.invstd[j]).collect();
    // dx = k·dy + u·(x − mean) + w per channel, k = γ·invstd; in train mode
    // u = −k·invstd·dγ / M and w = −k·dβ / M (the batch statistics' own gradient).
    let mf = m as f64;
    let k: Vec<f32> = (0..c).map(|j| (gamma[j] as f64 * st.invstd[j]) as f32).collect();
    let u: Vec<f32> = (0..c)
        .map(|j| if train { (-(gamma[j] as f64) * st.invstd[j] * st.invstd[j] * dgamma[j] / mf) as f32 } else { 0.0 })
        .collect();
    let w: Vec<f32> =
        (0..c).map(|j| if train { (-(gamma[j] as f64) * st.invstd[j] * dbeta[j] / mf) as f32 } else { 0.0 }).collect();
    let rows = (1usize << 14).div_ceil(c).max(1) * c;
    let dx = crate::cpu::par_build_init(x.len(), rows, Vec::new, |gm, bi, db| {
        let i0 = bi * rows;
        let gb = match rows_of(i0 / c, db.len() / c, gm) {
            Some(()) => &gm[..],
            None => &dy[i0..i0 + db.len()],
        };
        for ((dr, xr), gr) in db.chunks_exact_mut(c).zip(x[i0..].chunks_exact(c)).zip(gb.chunks_exact(c)) {
            let coef = k.iter().zip(&u).zip(w.iter().zip(&mean));
            for ((d, (&g, &x)), ((&k, &u), (&w, &mu))) in dr.iter_mut().zip(gr.iter().zip(xr)).zip(coef) {
                *d = k * g + u * (x - mu) + w;
            }
        }
    });
    (dx, dgamma.iter().map(|&v| v as f32).collect(), dbeta.iter().map(|&v| v as f32).collect())
}

/// Running statistics after one training forward.
pub struct BnUpdate {
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

/// Autograd op. In train mode (`g.is_training()`) returns the updated running statistics,
/// which the caller stores (and increments num_batches_tracked).
pub fn batch_norm(
    g: &Graph,
    x: &Var,
    gamma: &Var,
    beta: &Var,
    running_mean: &Tensor,
    running_var: &Tensor,
) -> Result<(Var, Option<BnUpdate>)> {
    let c = *x.shape().last().unwrap_or(&0);
    ensure!(
        c > 0 && gamma.shape() == [c] && beta.shape() == [c],
        "batch_norm: {} channels but γ {:?}, β {:?}",
        c,
        gamma.shape(),
        beta.shape()
    );
    if x.value.is_cuda() {
        return batch_norm_cuda(g, x, gamma, beta, running_mean, running_var);
    }
    let xs = x.value.f32s();
    let m = xs.len() / c;
    let train = g.is_training();
    let (st, update) = batch_stats_or_running(xs, c, m, train, running_mean, running_var, x.shape())?;
    let y = crate::profile::time(
        "batch_norm forward",
        || format!("{m}x{c}"),
        || bn_apply_cpu(xs, c, &st, gamma.value.f32s(), beta.value.f32s()),
    );
    let out = Tensor::from_f32(x.shape(), y);
    let (xv, gv) = (x.value.clone(), gamma.value.clone());
    let var = g.record("batch_norm", out, &[x, gamma, beta], move |dy| {
        let (dx, dg, db) = bn_backward_cpu(xv.f32s(), dy.f32s(), c, &st, gv.f32s(), train);
        Ok(vec![
            Some(Tensor::from_f32(xv.shape(), dx)),
            Some(Tensor::from_f32(&[c], dg)),
            Some(Tensor::from_f32(&[c], db)),
        ])
    });
    Ok((var, update))
}

/// Training: the batch's statistics and the updated running statistics; eval: the running
/// statistics as `BnStats`.
fn batch_stats_or_running(
    xs: &[f32],
    c: usize,
    m: usize,
    train: bool,
    running_mean: &Tensor,
    running_var: &Tensor,
    shape: &[usize],
) -> Result<(BnStats, Option<BnUpdate>)> {
    Ok(if train {
        ensure!(m > 1, "batch_norm: training needs more than one value per channel, input shape {shape:?}");
        let st = crate::profile::time("batch_norm stats", || format!("{m}x{c}"), || batch_stats_cpu(xs, c, BN_EPS));
        let unbias = m as f64 / (m as f64 - 1.0);
        let rm = running_mean
            .f32s()
            .iter()
            .zip(&st.mean)
            .map(|(&r, &b)| ((1.0 - BN_MOMENTUM) * r as f64 + BN_MOMENTUM * b) as f32)
            .collect();
        let rv = running_var
            .f32s()
            .iter()
            .zip(&st.var)
            .map(|(&r, &b)| ((1.0 - BN_MOMENTUM) * r as f64 + BN_MOMENTUM * b * unbias) as f32)
            .collect();
        (st, Some(BnUpdate { running_mean: Tensor::from_f32(&[c], rm), running_var: Tensor::from_f32(&[c], rv) }))
    } else {
        let mean = running_mean.f32s().iter().map(|&v| v as f64).collect();
        let invstd = running_var.f32s().iter().map(|&v| 1.0 / (v as f64 + BN_EPS).sqrt()).collect();
        (BnStats { mean, invstd, var: vec![] }, None)
    })
}

/// relu(batch_norm(x)) as one op on the CPU: BatchNorm's output is never stored, the ReLU
/// applied as it is written (the same f32 operations as `bn_apply_cpu` then
/// `relu_forward_cpu`), and the backward masks dy inside BatchNorm's backward
/// (`bn_backward_masked_cpu`): two passes over the activation fewer than the composition,
/// with its bits. On the device: the composition.
pub fn batch_norm_relu(
    g: &Graph,
    x: &Var,
    gamma: &Var,
    beta: &Var,
    running_mean: &Tensor,
    running_var: &Tensor,
) -> Result<(Var, Option<BnUpdate>)> {
    if x.value.is_cuda() {
        let (y, update) = batch_norm(g, x, gamma, beta, running_mean, running_var)?;
        return Ok((crate::ops::relu(g, &y)?, update));
    }
    let c = *x.shape().last().unwrap_or(&0);
    ensure!(
        c > 0 && gamma.shape() == [c] && beta.shape() == [c],
        "batch_norm: {} channels but γ {:?}, β {:?}",
        c,
        gamma.shape(),
        beta.shape()
    );
    let xs = x.value.f32s();
    let m = xs.len() / c;
    let train = g.is_training();
    let (st, update) = batch_stats_or_running(xs, c, m, train, running_mean, running_var, x.shape())?;
    // ReLU as `relu_forward_cpu` writes it.
    let relu = |v: f32| if v > 0.0 { v } else { 0.0 };
    let y = crate::profile::time(
        "batch_norm_relu forward",
        || format!("{m}x{c}"),
        || bn_apply_then(xs, c, &st, gamma.value.f32s(), beta.value.f32s(), relu),
    );
    let out = Tensor::from_f32(x.shape(), y);
    let (xv, gv, yv) = (x.value.clone(), gamma.value.clone(), g.needs_grad(&[x, gamma, beta]).then(|| out.clone()));
    let var = g.record("batch_norm_relu", out, &[x, gamma, beta], move |dy| {
        let y = yv.expect("saved output");
        let (dx, dg, db) = crate::profile::time("batch_norm_relu backward", String::new, || {
            bn_backward_masked_cpu(xv.f32s(), dy.f32s(), Some(y.f32s()), c, &st, gv.f32s(), train)
        });
        Ok(vec![
            Some(Tensor::from_f32(xv.shape(), dx)),
            Some(Tensor::from_f32(&[c], dg)),
            Some(Tensor::from_f32(&[c], db)),
        ])
    });
    Ok((var, update))
}

/// `batch_norm` on a CUDA tensor: statistics, running statistics and gradients stay on the device.
fn batch_norm_cuda(
    g: &Graph,
    x: &Var,
    gamma: &Var,
    beta: &Var,
    running_mean: &Tensor,
    running_var: &Tensor,
) -> Result<(Var, Option<BnUpdate>)> {
    use crate::cuda::ops::batchnorm as bn;
    let c = *x.shape().last().unwrap_or(&0);
    let m = x.value.numel() / c;
    let train = g.is_training();
    let dev = x.value.device();
    let (st, update) = if train {
        ensure!(m > 1, "batch_norm: training needs more than one value per channel, input shape {:?}", x.shape());
        let (st, rm, rv) = bn::train_stats(&x.value, c, BN_EPS, BN_MOMENTUM, running_mean, running_var)?;
        (st, Some(BnUpdate { running_mean: rm, running_var: rv }))
    } else {
        (bn::eval_stats(&running_mean.to_device(dev)?, &running_var.to_device(dev)?, BN_EPS)?, None)
    };
    let y = bn::apply(&x.value, c, &st, &gamma.value, &beta.value)?;
    let (xv, gv) = (x.value.clone(), gamma.value.clone());
    let var = g.record("batch_norm", y, &[x, gamma, beta], move |dy| {
        let (dx, dg, db) = bn::backward(&xv, &dy, c, &st, &gv, train)?;
        Ok(vec![Some(dx), Some(dg), Some(db)])
    });
    Ok((var, update))
}
