//! AVX2 + FMA register-tiled micro-kernels of the CPU convolutions.
//!
//! Both kernels read a row-structured operand `a` in which row r, tap group t, reduction index
//! k is `a[(r + offs[t])·rs + k]`: for the shifted 3×3×3 path `a` is the padded input
//! (rs = C, 9 tap groups of 3·C contiguous values), for the im2col path `a` is an im2col
//! block (rs = K, one group, offs = [0]). Output channels are padded to `cop`, a multiple of 8.
//!
//! - `forward_rows`: out[i, :] = bias + Σ_t Σ_k a[(r0 + i + offs[t])·rs + k] · bt[(t·kk + k)·cop + :]
//!   (written =), tiles of 6 rows × 16 channels held in 12 ymm registers over the whole
//!   reduction, so each output is stored once.
//! - `weight_grad_rows`: dwt[(t·kk + k)·cop + :] += Σ_{r0 ≤ r < r1} a[(r + offs[t])·rs + k] ·
//!   dyp[r·cop + :] (accumulated +=), tiles of 6 reduction indices × 16 channels over blocks of
//!   256 rows.
//!
//! Callers check AVX2/FMA support (`simd_available`) and that every index is in bounds; the
//! kernels are pointer arithmetic over those buffers, so per-operation unsafe blocks would
//! only add noise.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

/// Rows of the register tile.
const R: usize = 6;

/// Whether these kernels can run on this processor.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Panics unless every read of rows r0..r1 stays inside `a` (len) .
pub fn check_rows(a_len: usize, rs: usize, offs: &[usize], kk: usize, r0: usize, r1: usize) {
    let max_off = offs.iter().copied().max().unwrap_or(0);
    assert!(r1 <= r0 || (r1 - 1 + max_off) * rs + kk <= a_len, "conv kernel: rows {r0}..{r1} read past the operand");
}

/// out[i, :] = bias + Σ_t Σ_{k<kk} a[(r0 + i + offs[t])·rs + k] · bt[(t·kk + k)·cop + :]
/// for the rows of `out` ([nr, cop], cop a multiple of 8).
///
/// # Safety
/// AVX2 and FMA must be available; `check_rows(a.len(), rs, offs, kk, r0, r0 + nr)` must hold,
/// `bt` must hold offs.len()·kk·cop values and `bias` cop values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn forward_rows(a: &[f32], rs: usize, offs: &[usize], kk: usize, bt: &[f32], cop: usize, bias: &[f32], r0: usize, out: &mut [f32]) {
    let nr = out.len() / cop;
    debug_assert!(bt.len() >= offs.len() * kk * cop && bias.len() >= cop && cop % 8 == 0);
    let (xp, ci) = (a, rs);
    let (xp, bt, bias, o) = (xp.as_ptr(), bt.as_ptr(), bias.as_ptr(), out.as_mut_ptr());
    let mut cb = 0;
    while cb < cop {
        let two = cop - cb >= 16;
        let mut i = 0;
        while i < nr {
            // Balanced tiles (a run of 16 rows as 8 + 8, not 14 + 2): each row's sum is the same.
            let rows = (nr - i).div_ceil((nr - i).div_ceil(R));
            let args = (xp, ci, offs, kk, bt, cop, bias, r0 + i, cb, o.add(i * cop));
            macro_rules! tile {
                ($($n:literal),*) => {
                    match (rows, two) {
                        $(($n, true) => fwd_tile::<$n, 2>(args), ($n, false) => fwd_tile::<$n, 1>(args),)*
                        _ => unreachable!(),
                    }
                };
            }
            tile!(1, 2, 3, 4, 5, 6);
            i += rows;
        }
        cb += if two { 16 } else { 8 };
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_tile<const N: usize, const V: usize>(args: (*const f32, usize, &[usize], usize, *const f32, usize, *const f32, usize, usize, *mut f32)) {
    let (xp, ci, offs, kk, bt, cop, bias, r, cb, out) = args;
    let mut acc = [[_mm256_setzero_ps(); V]; N];
    for v in 0..V {
        let b = _mm256_loadu_ps(bias.add(cb + 8 * v));
        for a in acc.iter_mut() {
            a[v] = b;
        }
    }
    for (t, &off) in offs.iter().enumerate() {
        let a_base = xp.add((r + off) * ci);
        let b_base = bt.add(t * kk * cop + cb);
        for k in 0..kk {
            let mut bv = [_mm256_setzero_ps(); V];
            for v in 0..V {
                bv[v] = _mm256_loadu_ps(b_base.add(k * cop + 8 * v));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a_base.add(i * ci + k));
                for v in 0..V {
                    a[v] = _mm256_fmadd_ps(x, bv[v], a[v]);
                }
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        for v in 0..V {
            _mm256_storeu_ps(out.add(i * cop + cb + 8 * v), a[v]);
        }
    }
}

/// Rows per cache block of the weight-gradient loop.
const WG_ROWS: usize = 256;

/// dwt[(t·kk + k)·cop + :] += Σ_{r0 ≤ r < r1} a[(r + offs[t])·rs + k] · dyp[r·cop + :].
///
/// # Safety
/// AVX2 and FMA must be available; `check_rows(a.len(), rs, offs, kk, r0, r1)` must hold,
/// `dyp` must hold r1·cop values and `dwt` offs.len()·kk·cop.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn weight_grad_rows(a: &[f32], rs: usize, offs: &[usize], kk: usize, dyp: &[f32], cop: usize, r0: usize, r1: usize, dwt: &mut [f32]) {
    debug_assert!(dyp.len() >= r1 * cop && dwt.len() >= offs.len() * kk * cop && cop % 8 == 0);
    let ci = rs;
    let (xp, dy, d) = (a.as_ptr(), dyp.as_ptr(), dwt.as_mut_ptr());
    let mut rs = r0;
    while rs < r1 {
        let re = (rs + WG_ROWS).min(r1);
        let mut cb = 0;
        while cb < cop {
            let two = cop - cb >= 16;
            for (t, &off) in offs.iter().enumerate() {
                let mut k = 0;
                while k < kk {
                    let n = (kk - k).min(R);
                    let args = (xp.add(off * ci + k), ci, dy.add(cb), cop, rs, re, d.add((t * kk + k) * cop + cb));
                    macro_rules! tile {
                        ($($n:literal),*) => {
                            match (n, two) {
                                $(($n, true) => wg_tile::<$n, 2>(args), ($n, false) => wg_tile::<$n, 1>(args),)*
                                _ => unreachable!(),
                            }
                        };
                    }
                    tile!(1, 2, 3, 4, 5, 6);
                    k += n;
                }
            }
            cb += if two { 16 } else { 8 };
        }
        rs = re;
    }
}

/// acc[i, :] += Σ_r xa[r·C + i] · dy[r·cop + :] for r in rs..re, i < N; acc rows at stride cop.
#[target_feature(enable = "avx2,fma")]
unsafe fn wg_tile<const N: usize, const V: usize>(args: (*const f32, usize, *const f32, usize, usize, usize, *mut f32)) {
    let (xa, ci, dy, cop, rs, re, acc_ptr) = args;
    let mut acc = [[_mm256_setzero_ps(); V]; N];
    for (i, a) in acc.iter_mut().enumerate() {
        for v in 0..V {
            a[v] = _mm256_loadu_ps(acc_ptr.add(i * cop + 8 * v));
        }
    }
    for r in rs..re {
        let mut g = [_mm256_setzero_ps(); V];
        for v in 0..V {
            g[v] = _mm256_loadu_ps(dy.add(r * cop + 8 * v));
        }
        let xr = xa.add(r * ci);
        for (i, a) in acc.iter_mut().enumerate() {
            let x = _mm256_broadcast_ss(&*xr.add(i));
            for v in 0..V {
                a[v] = _mm256_fmadd_ps(x, g[v], a[v]);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        for v in 0..V {
            _mm256_storeu_ps(acc_ptr.add(i * cop + 8 * v), a[v]);
        }
    }
}
