//! 3-D convolution, stride 1, kernel k in {1, 3}, zero padding (k - 1) / 2, optional bias.
//!
//! Layout: x [N, X, Y, Z, Ci] (channels last), w [Co, kx, ky, kz, Ci] ("KRSC"), y [N, X, Y, Z, Co].
//! PyTorch's [Co, Ci, kx, ky, kz] weight is converted at the checkpoint boundary only.
//!
//! CPU algorithm (an implicit GEMM done in blocks): the M = N·X·Y·Z output voxels are cut
//! into blocks of rows; for each block a thread gathers its im2col rows (27 contiguous runs of
//! Ci values each, zero outside the volume) into a block-local buffer and multiplies it by
//! the weight, `y_block[R, Co] = cols[R, K] · wᵀ[K, Co]` with K = k³·Ci. The full im2col matrix
//! never exists, so memory stays O(threads · block). A 1×1×1 kernel is a plain GEMM on x.
//!
//! Backward:
//! - dx = conv(dy, w_flip) with w_flip[ci, a, b, c, co] = w[co, k-1-a, k-1-b, k-1-c, ci]
//!   (stride 1, same padding): the forward code again, with Ci and Co swapped.
//! - dw[Co, K] = Σ_blocks dy_blockᵀ · cols_block, accumulated per fixed group of blocks and
//!   summed in order (deterministic); db = Σ_rows dy.
//!
//! All outputs are written (=), never accumulated into caller memory.

use anyhow::{Result, ensure};
use rayon::prelude::*;

use crate::autograd::{Graph, Var};
use crate::cpu::{Mat, gemm, row_groups, sum_rows};
use crate::tensor::{Tensor, Vol};

/// Rows per block: about 256 Ki floats of im2col per block, at least 32 rows.
fn block_rows(kdim: usize) -> usize {
    ((1usize << 18) / kdim.max(1)).clamp(32, 4096)
}

/// Fill `cols` ([rows, k³·Ci]) with the im2col rows of output voxels `r0..r0+rows`.
fn im2col(x: &[f32], v: Vol, k: usize, r0: usize, rows: usize, cols: &mut [f32]) {
    let ci = v.c;
    let p = (k / 2) as isize;
    let kdim = k * k * k * ci;
    for r in 0..rows {
        let m = r0 + r;
        let zi = (m % v.z) as isize;
        let yi = ((m / v.z) % v.y) as isize;
        let xi = ((m / (v.z * v.y)) % v.x) as isize;
        let nb = m / (v.z * v.y * v.x);
        let row = &mut cols[r * kdim..(r + 1) * kdim];
        let mut o = 0;
        for a in 0..k as isize {
            let xs = xi + a - p;
            for b in 0..k as isize {
                let ys = yi + b - p;
                for c in 0..k as isize {
                    let zs = zi + c - p;
                    let dst = &mut row[o..o + ci];
                    if xs < 0 || ys < 0 || zs < 0 || xs >= v.x as isize || ys >= v.y as isize || zs >= v.z as isize {
                        dst.fill(0.0);
                    } else {
                        let src = (((nb * v.x + xs as usize) * v.y + ys as usize) * v.z + zs as usize) * ci;
                        dst.copy_from_slice(&x[src..src + ci]);
                    }
                    o += ci;
                }
            }
        }
    }
}

/// Forward on the CPU: returns y [N, X, Y, Z, Co].
pub fn conv3d_forward_cpu(x: &[f32], v: Vol, w: &[f32], bias: Option<&[f32]>, co: usize, k: usize) -> Vec<f32> {
    let kdim = k * k * k * v.c;
    assert_eq!(x.len(), v.voxels() * v.c, "conv3d: input size");
    assert_eq!(w.len(), co * kdim, "conv3d: weight size");
    let m = v.voxels();
    let mut y = vec![0.0f32; m * co];
    if m == 0 || co == 0 {
        return y;
    }
    let rows = block_rows(kdim);
    let wt = Mat::rows_t(w, kdim); // [K, Co] view of the [Co, K] weight
    y.par_chunks_mut(rows * co).enumerate().for_each_init(
        || vec![0.0f32; if k == 1 { 0 } else { rows * kdim }],
        |cols, (bi, yb)| {
            let r0 = bi * rows;
            let nr = yb.len() / co;
            let beta = match bias {
                Some(b) => {
                    for row in yb.chunks_exact_mut(co) {
                        row.copy_from_slice(b);
                    }
                    1.0
                }
                None => 0.0,
            };
            if k == 1 {
                gemm(nr, kdim, co, Mat::rows(&x[r0 * kdim..], kdim), wt, beta, yb, co);
            } else {
                im2col(x, v, k, r0, nr, cols);
                gemm(nr, kdim, co, Mat::rows(cols, kdim), wt, beta, yb, co);
            }
        },
    );
    y
}

/// The weight of the convolution that computes dx from dy: w_flip[ci, a, b, c, co].
pub fn flip_weight(w: &[f32], co: usize, ci: usize, k: usize) -> Vec<f32> {
    let k3 = k * k * k;
    let mut out = vec![0.0f32; w.len()];
    for o in 0..co {
        for s in 0..k3 {
            for i in 0..ci {
                out[(i * k3 + (k3 - 1 - s)) * co + o] = w[(o * k3 + s) * ci + i];
            }
        }
    }
    out
}

/// dx [N, X, Y, Z, Ci] from dy [N, X, Y, Z, Co].
pub fn conv3d_backward_input_cpu(dy: &[f32], v_out: Vol, w: &[f32], ci: usize, k: usize) -> Vec<f32> {
    let co = v_out.c;
    conv3d_forward_cpu(dy, v_out, &flip_weight(w, co, ci, k), None, ci, k)
}

/// (dw [Co, k, k, k, Ci], db [Co]) from the input x and dy.
pub fn conv3d_backward_weight_cpu(x: &[f32], v: Vol, dy: &[f32], co: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    let kdim = k * k * k * v.c;
    let m = v.voxels();
    assert_eq!(dy.len(), m * co, "conv3d backward: dy size");
    let rows = block_rows(kdim);
    let blocks = m.div_ceil(rows);
    let partials: Vec<Vec<f32>> = row_groups(blocks, 1)
        .into_par_iter()
        .map(|group| {
            let mut dw = vec![0.0f32; co * kdim];
            let mut cols = vec![0.0f32; if k == 1 { 0 } else { rows * kdim }];
            for bi in group {
                let r0 = bi * rows;
                let nr = rows.min(m - r0);
                let dyt = Mat::rows_t(&dy[r0 * co..], co); // [Co, R]
                if k == 1 {
                    gemm(co, nr, kdim, dyt, Mat::rows(&x[r0 * kdim..], kdim), 1.0, &mut dw, kdim);
                } else {
                    im2col(x, v, k, r0, nr, &mut cols);
                    gemm(co, nr, kdim, dyt, Mat::rows(&cols, kdim), 1.0, &mut dw, kdim);
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0.0f32; co * kdim];
    for p in partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dw, sum_rows(dy, co))
}

/// Autograd op. `w` is [Co, k, k, k, Ci].
pub fn conv3d(g: &Graph, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let v = Vol::of(&x.value);
    let ws = w.shape();
    ensure!(ws.len() == 5 && ws[1] == ws[2] && ws[2] == ws[3], "conv3d: weight must be [Co, k, k, k, Ci], found {ws:?}");
    let (co, k) = (ws[0], ws[1]);
    ensure!(k == 1 || k == 3, "conv3d: kernel {k} is not supported (1 or 3)");
    ensure!(ws[4] == v.c, "conv3d: weight expects {} input channels, input has {}", ws[4], v.c);
    if let Some(b) = b {
        ensure!(b.shape() == [co], "conv3d: bias shape {:?}, expected [{co}]", b.shape());
    }
    let y = conv3d_forward_cpu(x.value.f32s(), v, w.value.f32s(), b.map(|b| b.value.f32s()), co, k);
    let out = Tensor::from_f32(&v.with_c(co).shape(), y);
    let mut inputs = vec![x, w];
    if let Some(b) = b {
        inputs.push(b);
    }
    let (xs, ws_t, has_bias) = (x.value.clone(), w.value.clone(), b.is_some());
    let (need_dx, need_dw) = (x.tracked(), w.tracked() || b.is_some_and(|b| b.tracked()));
    Ok(g.record(out, &inputs, move |dy| {
        let vo = v.with_c(co);
        let dx = need_dx.then(|| {
            Tensor::from_f32(&v.shape(), conv3d_backward_input_cpu(dy.f32s(), vo, ws_t.f32s(), v.c, k))
        });
        let (dw, db) = if need_dw {
            let (dw, db) = conv3d_backward_weight_cpu(xs.f32s(), v, dy.f32s(), co, k);
            (Some(Tensor::from_f32(ws_t.shape(), dw)), Some(Tensor::from_f32(&[co], db)))
        } else {
            (None, None)
        };
        let mut grads = vec![dx, dw];
        if has_bias {
            grads.push(db);
        }
        Ok(grads)
    }))
}
