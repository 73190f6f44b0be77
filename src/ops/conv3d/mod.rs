//! 3-D convolution, stride 1, kernel k in {1, 3}, zero padding (k - 1) / 2, optional bias.
//!
//! Layout: x [N, X, Y, Z, Ci] (channels last), w [Co, kx, ky, kz, Ci] ("KRSC"), y [N, X, Y, Z, Co].
//! PyTorch's [Co, Ci, kx, ky, kz] weight is converted at the checkpoint boundary only.
//!
//! CPU algorithms. Volumes whose every axis is ≥ 2 (all 27 taps reachable) and not tiny use
//! the shifted-GEMM path of `shifted.rs` (no im2col copy, AVX2/FMA micro-kernels). Otherwise
//! (an implicit GEMM done in blocks): the M = N·X·Y·Z output voxels are cut
//! into blocks of rows; for each block a thread gathers its im2col rows (27 contiguous runs of
//! Ci values each, zero outside the volume) into a block-local buffer and multiplies it by
//! the weight, `y_block[R, Co] = cols[R, K] · wᵀ[K, Co]` with K = k³·Ci. The full im2col matrix
//! never exists, so memory stays O(threads · block). A 1×1×1 kernel is a plain GEMM on x.
//!
//! Backward:
//! - dx = conv(dy, w_flip) with w_flip[ci, a, b, c, co] = w[co, k-1-a, k-1-b, k-1-c, ci]
//!   (stride 1, same padding): the forward code again, with Ci and Co swapped.
//! - Taps that only ever read padding (an axis of extent 1 or 2 at the coarse levels) are
//!   dropped from the GEMM (`valid_taps`); their weight gradient is exactly 0.
//! - dw[Co, K] = Σ_blocks dy_blockᵀ · cols_block, accumulated per fixed group of blocks and
//!   summed in order (deterministic); db = Σ_rows dy.
//!
//! All outputs are written (=), never accumulated into caller memory.

use anyhow::{Result, ensure};
use rayon::prelude::*;

pub mod shifted;

use crate::autograd::{Graph, Var};
use crate::cpu::{Mat, gemm, row_groups, sum_in_order, sum_rows};
use crate::tensor::{Tensor, Vol};

/// Rows per block: about 256 Ki floats of im2col per block, at least 32 rows.
fn block_rows(kdim: usize) -> usize {
    ((1usize << 18) / kdim.max(1)).clamp(32, 4096)
}

/// Kernel taps (flattened a·k² + b·k + c) that reach inside the volume for some output voxel.
/// Along an axis of extent e, offset d = a − k/2 is reachable iff |d| < e, so small levels
/// (extent 1 or 2 along an axis) skip the taps that only ever read padding: the GEMM's K and
/// the weight traffic shrink by up to 27×. The set is symmetric under flipping.
pub fn valid_taps(v: Vol, k: usize) -> Vec<usize> {
    let p = (k / 2) as isize;
    let ok = |ext: usize, a: usize| (a as isize - p).unsigned_abs() < ext;
    let mut taps = Vec::with_capacity(k * k * k);
    for a in 0..k {
        for b in 0..k {
            for c in 0..k {
                if ok(v.x, a) && ok(v.y, b) && ok(v.z, c) {
                    taps.push((a * k + b) * k + c);
                }
            }
        }
    }
    taps
}

/// Fill `cols` ([rows, taps·Ci]) with the im2col rows of output voxels `r0..r0+rows`.
fn im2col(x: &[f32], v: Vol, k: usize, taps: &[usize], r0: usize, rows: usize, cols: &mut [f32]) {
    let ci = v.c;
    let p = (k / 2) as isize;
    let kdim = taps.len() * ci;
    for r in 0..rows {
        let m = r0 + r;
        let zi = (m % v.z) as isize;
        let yi = ((m / v.z) % v.y) as isize;
        let xi = ((m / (v.z * v.y)) % v.x) as isize;
        let nb = m / (v.z * v.y * v.x);
        let row = &mut cols[r * kdim..(r + 1) * kdim];
        for (t, &tap) in taps.iter().enumerate() {
            let xs = xi + (tap / (k * k)) as isize - p;
            let ys = yi + ((tap / k) % k) as isize - p;
            let zs = zi + (tap % k) as isize - p;
            let dst = &mut row[t * ci..(t + 1) * ci];
            if xs < 0 || ys < 0 || zs < 0 || xs >= v.x as isize || ys >= v.y as isize || zs >= v.z as isize {
                dst.fill(0.0);
            } else {
                let src = (((nb * v.x + xs as usize) * v.y + ys as usize) * v.z + zs as usize) * ci;
                dst.copy_from_slice(&x[src..src + ci]);
            }
        }
    }
}

/// The GEMM weight [Cout', T·Cin'] restricted to `taps`; with `flip`, the weight of the
/// convolution that maps dy to dx: w'[i, t, o] = w[o, k³−1−t, i] (Cout' = Ci, Cin' = Co).
pub fn pack_weight(w: &[f32], co: usize, ci: usize, k: usize, taps: &[usize], flip: bool) -> Vec<f32> {
    let k3 = k * k * k;
    let t = taps.len();
    if !flip {
        let mut out = vec![0.0f32; co * t * ci];
        out.par_chunks_mut(t * ci).enumerate().for_each(|(o, row)| {
            for (j, &tap) in taps.iter().enumerate() {
                row[j * ci..(j + 1) * ci].copy_from_slice(&w[(o * k3 + tap) * ci..(o * k3 + tap + 1) * ci]);
            }
        });
        out
    } else {
        let mut out = vec![0.0f32; ci * t * co];
        out.par_chunks_mut(t * co).enumerate().for_each(|(i, row)| {
            for (j, &tap) in taps.iter().enumerate() {
                let src_tap = k3 - 1 - tap;
                for (o, d) in row[j * co..(j + 1) * co].iter_mut().enumerate() {
                    *d = w[(o * k3 + src_tap) * ci + i];
                }
            }
        });
        out
    }
}

/// y = conv(x) with a packed weight `wp` [cout, taps·Ci].
fn conv_packed(x: &[f32], v: Vol, wp: &[f32], taps: &[usize], bias: Option<&[f32]>, co: usize, k: usize) -> Vec<f32> {
    let kdim = taps.len() * v.c;
    let m = v.voxels();
    let mut y = vec![0.0f32; m * co];
    if m == 0 || co == 0 {
        return y;
    }
    // A single centre tap reads x itself: no im2col copy.
    let direct = taps.len() == 1 && taps[0] == (k * k * k) / 2;
    let rows = block_rows(kdim);
    let wt = Mat::rows_t(wp, kdim); // [K, Co] view of the [Co, K] weight
    y.par_chunks_mut(rows * co).enumerate().for_each_init(
        || vec![0.0f32; if direct { 0 } else { rows * kdim }],
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
            if direct {
                gemm(nr, kdim, co, Mat::rows(&x[r0 * kdim..], kdim), wt, beta, yb, co);
            } else {
                im2col(x, v, k, taps, r0, nr, cols);
                gemm(nr, kdim, co, Mat::rows(cols, kdim), wt, beta, yb, co);
            }
        },
    );
    y
}

/// Forward on the CPU: returns y [N, X, Y, Z, Co].
pub fn conv3d_forward_cpu(x: &[f32], v: Vol, w: &[f32], bias: Option<&[f32]>, co: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), v.voxels() * v.c, "conv3d: input size");
    assert_eq!(w.len(), co * k * k * k * v.c, "conv3d: weight size");
    if shifted::applicable(v, k) {
        return shifted::forward(x, v, w, bias, co);
    }
    let taps = valid_taps(v, k);
    if taps.len() == k * k * k {
        conv_packed(x, v, w, &taps, bias, co, k)
    } else {
        conv_packed(x, v, &pack_weight(w, co, v.c, k, &taps, false), &taps, bias, co, k)
    }
}

/// dx [N, X, Y, Z, Ci] from dy [N, X, Y, Z, Co]: the forward with the flipped, transposed weight.
pub fn conv3d_backward_input_cpu(dy: &[f32], v_out: Vol, w: &[f32], ci: usize, k: usize) -> Vec<f32> {
    let co = v_out.c;
    assert_eq!(w.len(), co * k * k * k * ci, "conv3d backward: weight size");
    if k == 1 {
        // 1×1×1: dx = dy · w, with w [Co, Ci] read as the [K = Co, N = Ci] matrix directly.
        let mut dx = vec![0.0f32; v_out.voxels() * ci];
        crate::cpu::par_gemm(v_out.voxels(), co, ci, Mat::rows(dy, co), Mat::rows(w, ci), 0.0, &mut dx);
        return dx;
    }
    let taps = valid_taps(v_out, k);
    let wp = pack_weight(w, co, ci, k, &taps, true);
    if shifted::applicable(v_out, k) {
        return shifted::forward(dy, v_out, &wp, None, ci);
    }
    conv_packed(dy, v_out, &wp, &taps, None, ci, k)
}

/// (dw [Co, k, k, k, Ci], db [Co]) from the input x and dy.
pub fn conv3d_backward_weight_cpu(x: &[f32], v: Vol, dy: &[f32], co: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    let m = v.voxels();
    assert_eq!(dy.len(), m * co, "conv3d backward: dy size");
    if shifted::applicable(v, k) {
        return (shifted::weight_grad(x, v, dy, co), sum_rows(dy, co));
    }
    let taps = valid_taps(v, k);
    let k3 = k * k * k;
    let kdim = taps.len() * v.c;
    let direct = taps.len() == 1 && taps[0] == k3 / 2;
    let rows = block_rows(kdim);
    let blocks = m.div_ceil(rows);
    let partials: Vec<Vec<f32>> = row_groups(blocks, 1)
        .into_par_iter()
        .map(|group| {
            let mut dw = vec![0.0f32; co * kdim];
            let mut cols = vec![0.0f32; if direct { 0 } else { rows * kdim }];
            for bi in group {
                let r0 = bi * rows;
                let nr = rows.min(m - r0);
                let dyt = Mat::rows_t(&dy[r0 * co..], co); // [Co, R]
                if direct {
                    gemm(co, nr, kdim, dyt, Mat::rows(&x[r0 * kdim..], kdim), 1.0, &mut dw, kdim);
                } else {
                    im2col(x, v, k, &taps, r0, nr, &mut cols);
                    gemm(co, nr, kdim, dyt, Mat::rows(&cols, kdim), 1.0, &mut dw, kdim);
                }
            }
            dw
        })
        .collect();
    let dwc = sum_in_order(partials, co * kdim);
    let dw = if taps.len() == k3 {
        dwc
    } else {
        // Scatter the valid taps into the full kernel; the others only ever saw padding.
        let ci = v.c;
        let mut dw = vec![0.0f32; co * k3 * ci];
        for o in 0..co {
            for (j, &tap) in taps.iter().enumerate() {
                dw[(o * k3 + tap) * ci..(o * k3 + tap + 1) * ci].copy_from_slice(&dwc[(o * taps.len() + j) * ci..(o * taps.len() + j + 1) * ci]);
            }
        }
        dw
    };
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
