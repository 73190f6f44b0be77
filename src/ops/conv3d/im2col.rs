//! The im2col convolution path: any kernel size k ∈ {1, 3}, any volume (used where the
//! shifted path does not apply: coarse pyramid levels, 1×1×1 kernels).
//!
//! The M = N·X·Y·Z output voxels are cut into blocks of rows; for each block a thread gathers
//! its im2col rows — one run of Ci contiguous values per *valid* tap, zero outside the volume —
//! into a block-local buffer and multiplies it by the packed weight,
//! y_block[R, Co] = cols[R, K] · wᵀ[K, Co], K = taps·Ci. The full im2col matrix never exists.
//! A single centre tap (1×1×1 kernels, 1×1×1 volumes) reads x directly.
//! Weight gradient: dW = Σ_blocks colsᵀ · dy_block per fixed group of blocks, summed in order,
//! then scattered into the full kernel (unreached taps get exactly 0).
//! Outputs are written (=).

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::avx2;
use crate::cpu::{Mat, gemm, row_groups, sum_in_order, transpose_padded};

use super::CpuKernels;
use crate::tensor::Vol;

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
pub(super) fn im2col(x: &[f32], v: Vol, k: usize, taps: &[usize], r0: usize, rows: usize, cols: &mut [f32]) {
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
        // Blocks of 8 output rows i: each read of w is 8 contiguous values w[o, tap, i0..i0+8].
        let mut out = vec![0.0f32; ci * t * co];
        out.par_chunks_mut(8 * t * co).enumerate().for_each(|(bi, rows)| {
            let i0 = bi * 8;
            let ni = rows.len() / (t * co);
            for (j, &tap) in taps.iter().enumerate() {
                let src_tap = k3 - 1 - tap;
                for o in 0..co {
                    let src = &w[(o * k3 + src_tap) * ci + i0..(o * k3 + src_tap) * ci + i0 + ni];
                    for (di, &val) in src.iter().enumerate() {
                        rows[(di * t + j) * co + o] = val;
                    }
                }
            }
        });
        out
    }
}

/// y = conv(x) with a packed weight `wp` [co, taps·Ci].
#[allow(clippy::too_many_arguments)]
pub fn forward(
    x: &[f32],
    v: Vol,
    wp: &[f32],
    taps: &[usize],
    bias: Option<&[f32]>,
    co: usize,
    k: usize,
    kernels: CpuKernels,
) -> Vec<f32> {
    let kdim = taps.len() * v.c;
    let m = v.voxels();
    if m == 0 || co == 0 {
        return vec![0.0f32; m * co];
    }
    // A single centre tap reads x itself: no im2col copy.
    let direct = taps.len() == 1 && taps[0] == (k * k * k) / 2;
    let rows = block_rows(kdim);
    #[cfg(target_arch = "x86_64")]
    if kernels.simd() {
        let cop = co.next_multiple_of(8);
        let bt = transpose_padded(wp, co, kdim, kdim, cop); // [K, cop]
        let mut bias_p = vec![0.0f32; cop];
        if let Some(b) = bias {
            bias_p[..co].copy_from_slice(b);
        }
        if direct {
            avx2::check_rows(x.len(), kdim, &[0], kdim, 0, m);
        }
        let yp = crate::cpu::par_build_init(
            m * cop,
            rows * cop,
            || vec![0.0f32; if direct { 0 } else { rows * kdim }],
            |cols, bi, yb| {
                let nr = yb.len() / cop;
                // SAFETY: AVX2/FMA checked by the caller (`kernels`); operand bounds checked above
                // (direct) or by construction (the block's own im2col buffer).
                unsafe {
                    if direct {
                        let g = super::RowGemm::dense(x, kdim, &bt, cop, &bias_p);
                        kernels.forward_rows(&g, bi * rows, yb);
                    } else {
                        im2col(x, v, k, taps, bi * rows, nr, cols);
                        avx2::check_rows(cols.len(), kdim, &[0], kdim, 0, nr);
                        let g = super::RowGemm::dense(cols, kdim, &bt, cop, &bias_p);
                        kernels.forward_rows(&g, 0, yb);
                    }
                }
            },
        );
        return strip_columns(yp, cop, co);
    }
    let _ = kernels;
    let mut y = vec![0.0f32; m * co];
    let wt = Mat::rows_t(wp, kdim); // [K, Co] view of the [Co, K] weight
    y.par_chunks_mut(rows * co).enumerate().for_each_init(
        || vec![0.0f32; if direct { 0 } else { rows * kdim }],
        |cols, (bi, yb)| {
            let r0 = bi * rows;
            let nr = yb.len() / co;
            let beta = crate::cpu::fill_rows(yb, co, bias);
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

/// The first `c` columns of a [rows, width] matrix.
fn strip_columns(m: Vec<f32>, width: usize, c: usize) -> Vec<f32> {
    if width == c {
        return m;
    }
    let rows = m.len() / width;
    crate::cpu::par_build(rows * c, c * 1024, |i, d| {
        for (d, s) in d.chunks_exact_mut(c).zip(m[i * width * 1024..].chunks_exact(width)) {
            d.copy_from_slice(&s[..c]);
        }
    })
}

/// dw [Co, k, k, k, Ci] from x and dy.
pub fn weight_grad(
    x: &[f32],
    v: Vol,
    dy: &[f32],
    co: usize,
    k: usize,
    kernels: CpuKernels,
    prev: Option<Vec<f32>>,
) -> Vec<f32> {
    let taps = valid_taps(v, k);
    let k3 = k * k * k;
    let kdim = taps.len() * v.c;
    let m = v.voxels();
    let direct = taps.len() == 1 && taps[0] == k3 / 2;
    let rows = block_rows(kdim);
    let groups = row_groups(m.div_ceil(rows), 1);
    #[cfg(target_arch = "x86_64")]
    let dwc = if kernels.simd() {
        // One run per block of rows (the plan cuts it into cache blocks); `a` is x itself (the
        // centre tap alone) or the block's im2col buffer.
        let partials: Vec<Vec<f32>> = groups
            .into_par_iter()
            .map(|group| {
                let mut dw = vec![0.0f32; co * kdim];
                let mut cols = vec![0.0f32; if direct { 0 } else { rows * kdim }];
                for bi in group {
                    let r0 = bi * rows;
                    let nr = rows.min(m - r0);
                    if direct {
                        kernels.weight_grad_runs(
                            x,
                            dy,
                            &mut dw,
                            &kernels.weight_grad_plan(kdim, &[0], kdim, co, vec![(r0, r0, nr)]),
                        );
                    } else {
                        im2col(x, v, k, &taps, r0, nr, &mut cols);
                        kernels.weight_grad_runs(
                            &cols,
                            dy,
                            &mut dw,
                            &kernels.weight_grad_plan(kdim, &[0], kdim, co, vec![(0, r0, nr)]),
                        );
                    }
                }
                dw
            })
            .collect();
        sum_in_order(partials, co * kdim)
    } else {
        portable_weight_grad(x, v, dy, co, k, &taps, groups)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let dwc = {
        let _ = kernels;
        portable_weight_grad(x, v, dy, co, k, &taps, groups)
    };
    if taps.len() == k3 {
        return crate::cpu::added_onto(prev, dwc);
    }
    // Scatter the valid taps into the full kernel (the others only ever saw padding: zero;
    // each block of rows zeroed in cache just before, by both threads), or add them onto
    // prev's, leaving its other taps as they are (prev + 0) and unwritten.
    let (ci, t, row) = (v.c, taps.len(), k3 * v.c);
    let tap_runs = |dst_row: &mut [f32], src: &[f32], f: &dyn Fn(&mut [f32], &[f32])| {
        for (j, &tap) in taps.iter().enumerate() {
            f(&mut dst_row[tap * ci..(tap + 1) * ci], &src[j * ci..(j + 1) * ci]);
        }
    };
    match prev {
        Some(mut dw) => {
            assert_eq!(dw.len(), co * row, "conv3d backward: accumulated weight gradient size");
            dw.par_chunks_mut(row)
                .zip(dwc.par_chunks(t * ci))
                .for_each(|(r, src)| tap_runs(r, src, &|d, s| d.iter_mut().zip(s).for_each(|(d, s)| *d += *s)));
            dw
        }
        None => {
            let rows_per_chunk = (1usize << 16).div_ceil(row).max(1);
            crate::cpu::par_build(co * row, rows_per_chunk * row, |i, chunk| {
                for (r, dst) in chunk.chunks_exact_mut(row).enumerate() {
                    let o = i * rows_per_chunk + r;
                    tap_runs(dst, &dwc[o * t * ci..(o + 1) * t * ci], &|d, s| d.copy_from_slice(s));
                }
            })
        }
    }
}

fn portable_weight_grad(
    x: &[f32],
    v: Vol,
    dy: &[f32],
    co: usize,
    k: usize,
    taps: &[usize],
    groups: Vec<std::ops::Range<usize>>,
) -> Vec<f32> {
    let kdim = taps.len() * v.c;
    let m = v.voxels();
    let direct = taps.len() == 1 && taps[0] == (k * k * k) / 2;
    let rows = block_rows(kdim);
    let partials: Vec<Vec<f32>> = groups
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
                    im2col(x, v, k, taps, r0, nr, &mut cols);
                    gemm(co, nr, kdim, dyt, Mat::rows(&cols, kdim), 1.0, &mut dw, kdim);
                }
            }
            dw
        })
        .collect();
    sum_in_order(partials, co * kdim)
}
